# jit-broker's own OpenBao (or Vault) policy: everything the broker's token needs, nothing more.
# `jit vault-policy` prints this file. Install it once, with a token that may write policies:
#
#   jit vault-policy > jit-broker.hcl && bao policy write jit-broker jit-broker.hcl
#   bao write auth/token/roles/jit-broker orphan=true renewable=false \
#       allowed_policies="<every vault_policies name of the policy file>,jit-db-database-readonly"
#   bao token create -orphan -no-default-policy -policy=jit-broker -period=768h
#
# It is written for the engines at their default mounts (database/, ssh/) and for the roles the
# example policy names (database role "readonly", ssh role "jit-users"). Each entitlement with
# another role or mount needs the same lines with its names: see the comments of each block.
#
# Not here on purpose: sys/health (unauthenticated), anything under secret/ or other engines'
# data, sys/policy beyond the one pinned policy below, sys/mounts, auth methods. The token needs
# no "default" policy either (create it with -no-default-policy): the two paths of it the broker
# uses, its own token's lookup and renewal, are the first block below.

# --- The broker's own token ----------------------------------------------------------------------

# The broker looks its token up at start and renews it once less than half of its TTL (or period)
# is left, and says on /readyz when it cannot. These two paths usually come with the "default"
# policy, which this token does not have. Both act on the calling token alone: renewing or looking
# up any other token is another path (auth/token/renew, renew-accessor, lookup), not granted.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# --- Vault tokens (backend "vault_token") and the database backend's per-grant tokens ----------

# Every token the broker issues is made through the token role jit-broker, never through
# auth/token/create: a non-root token may only create tokens whose policies are a subset of its
# own, and `sudo` on the create path would let it create a token with any policy but root. The
# role instead admits exactly the policies in its allowed_policies (the entitlements'
# vault_policies and the database backend's jit-db-* policies; "default" is always admitted),
# makes orphans (a grant's token outlives nothing of the broker's own token, and is not cut short
# by its TTL) and refuses renewal. The broker still caps each token with explicit_max_ttl.
path "auth/token/create/jit-broker" {
  capabilities = ["update"]
}

# Removal and its proof: revoke a token by accessor, then look the accessor up until OpenBao no
# longer knows it. The reconciler reads each token's metadata (jit_grant_id, jit_broker) the
# same way.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

# The reconciler lists every token accessor to find what the broker made and never recorded
# (a broker killed between OpenBao's answer and its record), and the reaper lists them to prove
# many tokens gone at once when windows close together. Listing accessors needs sudo.
path "auth/token/accessors" {
  capabilities = ["list", "sudo"]
}

# --- Database credentials (backend "database", mount database/, role readonly) ---------------

# The entitlement's role is read and copied, per grant, to jit-readonly-<grant>-<random> with a
# lease TTL that ends at the window end; the copy is deleted at removal. One pair of paths per
# database role an entitlement names: database/roles/<role>, database/roles/jit-<role>-*.
path "database/roles/readonly" {
  capabilities = ["read"]
}
path "database/roles/jit-readonly-*" {
  capabilities = ["create", "update", "delete"]
}

# The per-grant token that reads the user holds one policy, jit-db-<mount>-<role>, which the
# broker writes on every issue (so a deleted or edited one mends itself). The body is pinned:
# the broker may write this policy with exactly this text and nothing else, or it could grant
# itself anything through a policy of its own making and a token made with it.
path "sys/policy/jit-db-database-readonly" {
  capabilities = ["create", "update"]
  allowed_parameters = {
    "policy" = ["path \"database/creds/jit-readonly-*\" { capabilities = [\"read\"] }"]
  }
}

# Removal revokes the user's lease (the role's revocation statements drop the user) and
# verification looks it up until OpenBao no longer knows it: only the leases of the broker's
# per-grant roles (lease ids are <mount>/creds/<role>/<id>).
path "sys/leases/revoke" {
  capabilities = ["update"]
  allowed_parameters = {
    "lease_id" = ["database/creds/jit-*"]
  }
}
path "sys/leases/lookup" {
  capabilities = ["update"]
  allowed_parameters = {
    "lease_id" = ["database/creds/jit-*"]
  }
}

# A credential the reconciler finds by its per-grant token alone has no lease id: its leases are
# listed under the per-grant role's prefix. Listing leases needs sudo.
path "sys/leases/lookup/database/creds/jit-*" {
  capabilities = ["list", "sudo"]
}

# --- SSH certificates (backend "ssh", mount ssh/, role jit-users) ------------------------------

# Sign the requester's public key for the entitlement's principals; one path per ssh role an
# entitlement names: ssh/sign/<role>. Nothing of a certificate is kept, so nothing to revoke.
path "ssh/sign/jit-users" {
  capabilities = ["update"]
}

# --- Access tokens for tools (OAuth; transit mount transit/, key jit-broker-tokens) -----------

# The broker signs its JWT access tokens (ES256) with an ecdsa-p256 transit key: it sends the
# signing input and gets the signature back; the private key never leaves OpenBao. Other keys of
# the mount are not signable with this token. With another [oauth] transit_mount or signing_key,
# the same two paths with those names.
path "transit/sign/jit-broker-tokens" {
  capabilities = ["update"]
}

# Read the key's public versions, for the JWK Set at /.well-known/jwks.json and for the version
# to sign with. Not here on purpose: transit/export (the private key), transit/keys/*/rotate and
# */config (rotating and retiring versions is the operator's, with a token of their own).
path "transit/keys/jit-broker-tokens" {
  capabilities = ["read"]
}

# --- Audit checkpoints (transit mount transit/, key jit-broker-audit) ---------------------------

# The broker signs each audit checkpoint (the log's size and head hash) with an ed25519 (or
# ecdsa-p256) transit key: the private key never reaches the broker's disk, so whoever gets onto
# the broker's host cannot take it away and sign rewritten logs elsewhere. With another [audit]
# transit_mount or transit_key, the same two paths with those names.
path "transit/sign/jit-broker-audit" {
  capabilities = ["update"]
}

# Read the key's public versions: the version to sign with, the keys `jit audit verify` checks
# checkpoints against and an export bundle carries. Not here on purpose, as for the token key:
# export, rotate, config, delete (rotation and retirement are the operator's).
path "transit/keys/jit-broker-audit" {
  capabilities = ["read"]
}

# --- Audit checkpoint witness (KV v2 mount secret/, path jit-broker/audit-checkpoints) --------

# Every checkpoint is also written here as a new version of one secret ([audit] witness_kv),
# which `jit audit verify --witness openbao` holds the local log against. Create and update add
# a version; read lets the broker's own `jit audit` compare. Not here on purpose: delete,
# undelete, destroy and anything under metadata/ (deleting the secret, or lowering its
# max_versions), so nothing the broker's token can do takes back a witnessed checkpoint.
path "secret/data/jit-broker/audit-checkpoints" {
  capabilities = ["create", "update", "read"]
}
