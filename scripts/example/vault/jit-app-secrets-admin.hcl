path "secret/data/app/*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "secret/metadata/app/*" {
  capabilities = ["list", "read", "delete"]
}
