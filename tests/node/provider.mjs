// A real OpenID provider for the gateway's black-box tests: oidc-provider (panva), issuing
// RFC 9068 JWT access tokens (RS256, typ at+jwt) for a resource through client_credentials.
//
//   node provider.mjs --port P --issuer http://127.0.0.1:P/oauth2/default --keys keys.json
//                     [--resource api://default ...] [--ttl 300] [--claims '{"email": ...}']
//                     [--clients '[{"client_id", "client_secret", "auth_method", "claims", "ttl"}]']
//
// --keys is a private JWK set ({"keys": [...]}); the first RS256 key signs, every key is
// published, so a test rotates keys by restarting this process with another file.
// --resource may repeat: each is a resource indicator whose tokens carry it as `aud`.
// --claims go into every access token; a client's own `claims` are merged over them.
// GET /__stats (outside the issuer path) answers {"jwks": N, "discovery": N, "token": N}:
// how often each endpoint was requested, so tests count key fetches from the provider's side.
// Prints "ready <issuer>" on stdout once listening; exits 0 on SIGTERM or SIGINT.

import * as http from 'node:http';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

// oidc-provider warns at import time on Node 20 (it wants 22 LTS); the tests pin their Node
// through the machine, so that one line is noise. Anything else still reaches stderr.
const warn = console.warn;
console.warn = (...args) => {
  if (!String(args[0]).includes('Unsupported runtime')) warn(...args);
};
const { default: Provider, errors } = await import('oidc-provider');
console.warn = warn;

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string' },
    issuer: { type: 'string' },
    keys: { type: 'string' },
    resource: { type: 'string', multiple: true, default: ['api://default'] },
    ttl: { type: 'string', default: '300' },
    claims: { type: 'string', default: '{}' },
    clients: { type: 'string' },
  },
});
for (const required of ['port', 'issuer', 'keys']) {
  if (!opts[required]) {
    console.error(`provider.mjs: --${required} is required`);
    process.exit(2);
  }
}

const ttl = Number(opts.ttl);
const resources = new Set(opts.resource);
const defaultClaims = JSON.parse(opts.claims);
const clients = opts.clients
  ? JSON.parse(opts.clients)
  : [{ client_id: 'test-client', client_secret: 'test-secret' }];
const claimsByClient = new Map(
  clients.map((c) => [c.client_id, { ...defaultClaims, ...(c.claims ?? {}) }]),
);
// A client's own `ttl` (seconds) lets one provider issue both long- and short-lived tokens.
const ttlOf = (clientId) => clients.find((c) => c.client_id === clientId)?.ttl ?? ttl;

// Tokens of client_credentials in JWT format are never looked up again, and nothing here
// outlives the process: a Map is all the storage needed (and avoids the dev-adapter warning).
const store = new Map();
class MapAdapter {
  constructor(model) {
    this.model = model;
  }
  key(id) {
    return `${this.model}:${id}`;
  }
  async upsert(id, payload) {
    store.set(this.key(id), payload);
  }
  async find(id) {
    return store.get(this.key(id));
  }
  async findByUid() {
    return undefined;
  }
  async findByUserCode() {
    return undefined;
  }
  async consume(id) {
    const payload = store.get(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }
  async destroy(id) {
    store.delete(this.key(id));
  }
  async revokeByGrantId() {}
}

const provider = new Provider(opts.issuer, {
  adapter: MapAdapter,
  jwks: JSON.parse(readFileSync(opts.keys, 'utf8')),
  clients: clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    token_endpoint_auth_method: c.auth_method ?? 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  })),
  cookies: { keys: ['test-only-cookie-key'] },
  clientBasedCORS: () => false,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf ?? opts.resource[0],
      getResourceServerInfo: (ctx, resource, client) => {
        if (!resources.has(resource)) throw new errors.InvalidTarget();
        return {
          scope: '',
          audience: resource,
          accessTokenTTL: ttlOf(client.clientId),
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: { ClientCredentials: (ctx, token, client) => ttlOf(client.clientId) },
  // RFC 9068 tokens get these next to sub (= client_id), iss, aud, exp, iat, jti, client_id.
  extraTokenClaims: (ctx, token) => claimsByClient.get(token.clientId),
  formats: {
    customizers: {
      // A client's configured `sub` stands for the user it acts for (as in an Okta user's
      // token), since client_credentials would otherwise always name the client itself.
      jwt: (ctx, token, jwt) => {
        const sub = claimsByClient.get(token.clientId)?.sub;
        if (sub !== undefined) jwt.payload.sub = sub;
      },
    },
  },
});
const issuerPath = new URL(opts.issuer).pathname.replace(/\/$/, '');
const counted = {
  jwks: new URL(provider.urlFor('jwks')).pathname,
  discovery: `${issuerPath}/.well-known/openid-configuration`,
  token: new URL(provider.urlFor('token')).pathname,
};
const stats = Object.fromEntries(Object.keys(counted).map((name) => [name, 0]));
const callback = provider.callback();

const server = http.createServer((req, res) => {
  const path = (req.url ?? '/').split('?')[0];
  if (path === '/__stats') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(stats));
    return;
  }
  for (const [name, countedPath] of Object.entries(counted)) {
    if (path === countedPath) stats[name] += 1;
  }
  if (issuerPath && !(path === issuerPath || path.startsWith(`${issuerPath}/`))) {
    res.writeHead(404).end();
    return;
  }
  // Mounted under the issuer's path, as a connect app would mount it: the provider routes
  // the rest and rebuilds its own URLs from originalUrl.
  req.originalUrl = req.url;
  const rest = req.url.slice(issuerPath.length);
  req.url = rest.startsWith('/') ? rest : `/${rest}`;
  callback(req, res);
});

// A server error is a defect here, worth seeing; client errors are what some tests provoke.
provider.on('server_error', (ctx, err) => console.error('provider server_error:', err));

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(Number(opts.port), '127.0.0.1', () => {
  console.log(`ready ${provider.issuer}`);
});
