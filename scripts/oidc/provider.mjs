// A real OpenID provider (the certified npm package oidc-provider) for jit-broker's tests and dev
// stack. Not for production: in-memory storage, keys made at start, any password accepted.
//
// Usage: node provider.mjs CONFIG.json, where the config holds port, issuer, clients (oidc-provider
// client metadata), api_resource, accounts ({username: {email, name, groups, email_verified}}) and
// optionally access_token_ttls ({client_id: seconds}). The accounts are read from the file again on
// each use, so a test can change someone's groups, or remove them, while the provider runs.
//
// What it does on top of oidc-provider's defaults:
// - PKCE (S256) required for every client; client_credentials enabled.
// - scopes openid, email, profile and groups; ID tokens carry the claims of the granted scopes.
// - access tokens for api_resource are RS256 JWTs (typ at+jwt, RFC 9068), 10 minutes, with the
//   account's email, email_verified, name and groups; the resource is the default when a request
//   names none. An account's email is verified unless it says `email_verified: false`.
// - its own login page at /interaction/:uid (username + any password; unknown users refused) and
//   no consent screen for the configured clients (they are first-party).
// - refresh tokens for every client allowed the refresh_token grant (no offline_access needed),
//   rotated on each use; they end with the provider's login session. A refresh gives a new ID
//   token with the account's current claims, and fails once the account is gone.
// - RP-initiated logout (end_session_endpoint) to a client's registered post_logout_redirect_uris.
// - the device authorization grant (RFC 8628) for clients allowed its grant type, with plain
//   pages: /device?user_code=... shows one confirm form, then the login form, then "Signed in".
// - native clients (application_type "native", the CLI) may use their loopback redirect URI on
//   any port (RFC 8252 §7.3); oidc-provider does that itself.

import crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const ACCESS_TOKEN_TTL = 600;

const configPath = process.argv[2] ?? usage();
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const { issuer, api_resource: apiResource } = config;
const host = config.host ?? '127.0.0.1';
// Seconds, by client id: lets a test obtain a real token that really runs out.
const accessTokenTTLs = config.access_token_ttls ?? {};
const accessTokenTTL = (client) => accessTokenTTLs[client?.clientId] ?? ACCESS_TOKEN_TTL;

/** The accounts as the config file says now (a test may have changed them). */
function accounts() {
  return JSON.parse(readFileSync(configPath, 'utf8')).accounts;
}

function usage() {
  console.error('usage: node provider.mjs CONFIG.json');
  process.exit(2);
}

/** A fresh RS256 signing key per run, so no key material ever lands on disk. */
function signingKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };
}

/** Client metadata as given; a client that cannot use the code flow also has no response types. */
function clientMetadata(client) {
  const grants = client.grant_types ?? ['authorization_code'];
  if (!grants.includes('authorization_code') && client.response_types === undefined) {
    return { ...client, response_types: [] };
  }
  return client;
}

function profile(accountId) {
  const account = accounts()[accountId];
  return {
    email: account.email,
    email_verified: account.email_verified ?? true,
    name: account.name ?? accountId,
    preferred_username: accountId,
    groups: account.groups ?? [],
  };
}

/** Grant the first-party clients what they ask for, so no consent screen is shown. */
async function firstPartyGrant(ctx) {
  const { oidc } = ctx;
  const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
  const grant = (grantId && await oidc.provider.Grant.find(grantId))
    || new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId });
  grant.addOIDCScope([...oidc.requestParamScopes].join(' '));
  grant.addOIDCClaims([...oidc.requestParamClaims]);
  for (const [indicator, server] of Object.entries(oidc.resourceServers)) {
    if (server.scope) grant.addResourceScope(indicator, server.scope);
  }
  await grant.save();
  return grant;
}

const provider = new Provider(issuer, {
  clients: config.clients.map(clientMetadata),
  jwks: { keys: [signingKey()] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  pkce: { required: () => true },
  conformIdTokenClaims: false,
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  async findAccount(ctx, sub) {
    if (!Object.hasOwn(accounts(), sub)) return undefined;
    return { accountId: sub, claims: async () => ({ sub, ...profile(sub) }) };
  },
  loadExistingGrant: firstPartyGrant,
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: true,
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      userCodeInputSource: deviceInputPage,
      userCodeConfirmSource: deviceConfirmPage,
      successSource: deviceSuccessPage,
    },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf ?? apiResource,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, indicator, client) => {
        if (indicator !== apiResource) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
        return {
          scope: '',
          audience: apiResource,
          accessTokenTTL: accessTokenTTL(client),
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  async extraTokenClaims(ctx, token) {
    if (!token.accountId || !Object.hasOwn(accounts(), token.accountId)) return undefined;
    const { email, email_verified, name, groups } = profile(token.accountId);
    return { email, email_verified, name, groups };
  },
  ttl: {
    AccessToken: (ctx, token, client) => accessTokenTTL(client),
    ClientCredentials: (ctx, token, client) => accessTokenTTL(client),
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 600,
    Session: 8 * 3600,
    Grant: 8 * 3600,
  },
});

for (const event of ['server_error', 'authorization.error', 'grant.error', 'introspection.error']) {
  provider.on(event, (ctx, error) => {
    console.error(`oidc-provider ${event}: ${error.message} ${error.error_description ?? ''}`);
  });
}

// ---- the login page ---------------------------------------------------------------------------

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(res, status, title, body) {
  res.writeHead(status, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
  res.end(`<!doctype html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>${body}</body></html>`);
}

function loginForm(res, uid, { status = 200, error = '', username = '' } = {}) {
  const message = error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : '';
  page(res, status, 'Sign in', `${message}
<form method="post" action="/interaction/${escapeHtml(uid)}" autocomplete="off">
  <input type="hidden" name="prompt" value="login">
  <label>Username <input type="text" name="username" value="${escapeHtml(username)}" required autofocus></label>
  <label>Password <input type="password" name="password" required></label>
  <button type="submit">Sign in</button>
</form>`);
}

// The device flow's pages (oidc-provider renders them into ctx.body; `form` is its own form).
function devicePage(ctx, title, body) {
  ctx.type = 'html';
  ctx.set('Cache-Control', 'no-store');
  ctx.body = `<!doctype html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>${body}</body></html>`;
}

async function deviceInputPage(ctx, form, out, err) {
  const message = err ? '<p class="error" role="alert">That code is not valid. Try again.</p>' : '';
  devicePage(ctx, 'Enter the code', `${message}${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`);
}

async function deviceConfirmPage(ctx, form, client, deviceInfo, userCode) {
  devicePage(ctx, 'Confirm the device', `<p>${escapeHtml(client.clientId)} asks to sign in with the
code <code>${escapeHtml(userCode)}</code>. Continue only if your terminal shows this code.</p>${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>`);
}

async function deviceSuccessPage(ctx) {
  devicePage(ctx, 'Signed in', '<p>You are signed in; go back to your terminal.</p>');
}

function consentForm(res, uid, clientId) {
  page(res, 200, 'Authorize', `<p>${escapeHtml(clientId)} asks to use your identity.</p>
<form method="post" action="/interaction/${escapeHtml(uid)}">
  <input type="hidden" name="prompt" value="consent">
  <button type="submit">Continue</button>
</form>`);
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 64 * 1024) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

async function interaction(req, res) {
  const { uid, prompt, params, session, grantId } = await provider.interactionDetails(req, res);
  if (req.method === 'GET') {
    if (prompt.name === 'login') return loginForm(res, uid, { username: params.login_hint ?? '' });
    return consentForm(res, uid, params.client_id);
  }
  if (req.method !== 'POST') return page(res, 405, 'Method not allowed', '');
  const form = await readForm(req);
  if (form.get('prompt') === 'login' && prompt.name === 'login') {
    const username = (form.get('username') ?? '').trim();
    if (!Object.hasOwn(accounts(), username) || !form.get('password')) {
      return loginForm(res, uid, { status: 401, error: 'Unknown user or missing password.', username });
    }
    return provider.interactionFinished(req, res, { login: { accountId: username } },
      { mergeWithLastSubmission: false });
  }
  if (form.get('prompt') === 'consent' && prompt.name === 'consent') {
    const grant = (grantId && await provider.Grant.find(grantId))
      || new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } },
      { mergeWithLastSubmission: true });
  }
  return page(res, 400, 'Bad request', '<p>This form does not match the pending step.</p>');
}

// ---- the server -------------------------------------------------------------------------------

const handleOidc = provider.callback();
const server = http.createServer((req, res) => {
  if (!new URL(req.url, issuer).pathname.startsWith('/interaction/')) return handleOidc(req, res);
  return interaction(req, res).catch((error) => {
    // Most often an expired or unknown interaction (its cookie is gone): start the login again.
    console.error(`oidc-provider interaction error: ${error.message}`);
    if (!res.headersSent) page(res, 400, 'Sign-in failed', `<p>${escapeHtml(error.message)}</p>`);
    else res.end();
  });
});

server.listen(config.port, host, () => {
  console.log(`oidc-provider listening on ${issuer}`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
