// A third-party backend's check of the gateway's identity assertion (headers.assertion,
// issue 4): the npm package `jose` verifies the token with nothing but the gateway's JWKS URL,
// the way a backend written without any of the gateway's code would.
//
// Usage:
//   node verify_assertion.mjs --jwks URL --issuer ISS --audience ORIGIN
//        [--alg RS256] [--current-date EPOCH_SECONDS] [TOKEN]
//   node verify_assertion.mjs --jwks URL --issuer ISS --audience ORIGIN --batch
//
// One token (from argv, else stdin): prints one JSON line and exits
//   0  {"ok": true, "payload": {...}, "protectedHeader": {...}}
//   1  {"ok": false, "code": err.code, "message": ..., "claim"?: ..., "reason"?: ...}
//   2  {"ok": false, "code": "ERR_USAGE", ...}  (a broken invocation is never a "rejection")
//   3  {"ok": false, "code": "ERR_CRASH", ...}  (a bug here, stack on stderr)
// --batch: stdin holds JSON lines {token, currentDate?, audience?, issuer?, alg?} (missing
// fields fall back to the flags); one result line each, in order, from one JWKS fetch; exit 0
// when all verified, 1 when any was refused, 2 or 3 as above.

import { parseArgs } from 'node:util'
import { createRemoteJWKSet, jwtVerify } from 'jose'

const TYP = 'identity+jwt'
const REQUIRED_CLAIMS = ['sub', 'exp', 'iat', 'iss', 'aud']

class UsageError extends Error {}

async function readStdin() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}

function flags() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      jwks: { type: 'string' },
      issuer: { type: 'string' },
      audience: { type: 'string' },
      // Pinned: the token's own `alg` header never chooses (RFC 8725 §3.1); jose also refuses
      // a JWKS key whose `alg` differs from the token's.
      alg: { type: 'string', default: 'RS256' },
      'current-date': { type: 'string' },
      batch: { type: 'boolean', default: false },
    },
  })
  for (const name of ['jwks', 'issuer', 'audience']) {
    if (!values[name]) throw new UsageError(`--${name} is required`)
  }
  if (positionals.length > (values.batch ? 0 : 1)) throw new UsageError('too many arguments')
  return {
    jwks: values.jwks,
    batch: values.batch,
    token: positionals[0],
    defaults: {
      issuer: values.issuer,
      audience: values.audience,
      alg: values.alg,
      currentDate: values['current-date'],
    },
  }
}

function epochSeconds(value) {
  if (value === undefined || value === null) return undefined
  const seconds = Number(value)
  if (!Number.isFinite(seconds)) throw new UsageError('currentDate takes epoch seconds')
  return new Date(seconds * 1000)
}

async function verify(token, check, jwks) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token, jwks, {
      issuer: check.issuer,
      audience: check.audience,
      algorithms: check.alg.split(','),
      typ: TYP,
      requiredClaims: REQUIRED_CLAIMS,
      currentDate: epochSeconds(check.currentDate),
    })
    return { ok: true, payload, protectedHeader }
  } catch (err) {
    if (err instanceof UsageError) throw err
    const result = { ok: false, code: err.code ?? err.name, message: err.message }
    // JWTClaimValidationFailed / JWTExpired say which claim failed: tests pin the cause.
    if (err.claim !== undefined) Object.assign(result, { claim: err.claim, reason: err.reason })
    return result
  }
}

function parseLine(line) {
  let item
  try {
    item = JSON.parse(line)
  } catch {
    throw new UsageError('a batch line is not JSON')
  }
  if (typeof item?.token !== 'string') throw new UsageError('a batch line has no "token"')
  return item
}

async function main() {
  const opts = flags()
  // Bounded: a gateway that does not answer must fail the check, not hang it.
  const jwks = createRemoteJWKSet(new URL(opts.jwks), { timeoutDuration: 5000 })
  const input = opts.token ?? (await readStdin())
  if (!opts.batch) {
    const token = input.trim()
    if (!token) throw new UsageError('no token given')
    return [await verify(token, opts.defaults, jwks)]
  }
  const items = input.split('\n').filter((line) => line.trim()).map(parseLine)
  const results = []
  for (const { token, ...overrides } of items) {
    results.push(await verify(token, { ...opts.defaults, ...overrides }, jwks))
  }
  return results
}

try {
  const results = await main()
  for (const result of results) process.stdout.write(JSON.stringify(result) + '\n')
  process.exitCode = results.every((result) => result.ok) ? 0 : 1
} catch (err) {
  // Only a verdict on the token may exit 1: a bad invocation (2) or a crash (3) must never
  // read as "refused".
  const usage = err instanceof UsageError || /^ERR_(PARSE_ARGS_|INVALID_URL)/.test(err.code)
  if (!usage) console.error(err)
  const code = usage ? 'ERR_USAGE' : 'ERR_CRASH'
  process.stdout.write(JSON.stringify({ ok: false, code, message: err.message }) + '\n')
  process.exitCode = usage ? 2 : 3
}
