// GramJS (the `telegram` npm package) as a real WebSocket client: trusts the
// gateway's RSA key, runs the handshake over ws://HOST:PORT/apiws and sends
// ping. Usage: node ws_ping.js GRAMJS_DIR PORT PUBLIC_KEY_PEM TRANSPORT [wss]
// (TRANSPORT: obfuscated | abridged; `wss`: TLS on any port, trusting the CA
// in NODE_EXTRA_CA_CERTS). Prints "pong <ping_id>" on success.
//
// GramJS builds the auth key from a minimal-length byte array, so about one
// handshake in 256 fails with "Step 3 invalid new nonce hash" against any
// correct server (real GramJS apps reconnect). That one error is retried once
// with a fresh handshake and reported on stderr as "gramjs-retry: ..." so
// callers can count it; any other failure, or a second one, fails.
"use strict";

const fs = require("fs");
const crypto = require("crypto");
const path = require("path");

const [dir, port, pemPath, transport, scheme] = process.argv.slice(2);
const lib = (name) => require(path.join(dir, "node_modules", name));
const bigInt = lib("big-integer");
const { MTProtoSender } = lib("telegram/network");
const { ConnectionTCPObfuscated, ConnectionTCPAbridged } = lib("telegram/network/connection");
const { PromisedWebSockets, Logger } = lib("telegram/extensions");
const { Api } = lib("telegram/tl");
const { AuthKey } = lib("telegram/crypto/AuthKey");
const RSA = lib("telegram/crypto/RSA");

/** Telegram's key fingerprint: low 64 bits of SHA1 over TL bytes n and e. */
function tlBytes(buf) {
  const head = buf.length < 254 ? Buffer.from([buf.length]) : Buffer.from([254, buf.length & 0xff, (buf.length >> 8) & 0xff, buf.length >> 16]);
  const body = Buffer.concat([head, buf]);
  const pad = (4 - (body.length % 4)) % 4;
  return Buffer.concat([body, Buffer.alloc(pad)]);
}

function trustServerKey(pem) {
  const jwk = crypto.createPublicKey(pem).export({ format: "jwk" });
  const n = Buffer.from(jwk.n, "base64url");
  const e = Buffer.from(jwk.e, "base64url");
  const digest = crypto.createHash("sha1").update(Buffer.concat([tlBytes(n), tlBytes(e)])).digest();
  const fingerprint = digest.readBigInt64LE(12);
  RSA._serverKeys.set(fingerprint.toString(), { n: bigInt(n.toString("hex"), 16), e: parseInt(e.toString("hex"), 16) });
}

/** GramJS picks wss:// only for port 443; tests serve TLS on a free port. */
class SecureWebSockets extends PromisedWebSockets {
  getWebSocketLink(ip, p, testServers) {
    return `wss://${ip}:${p}/apiws${testServers ? "_test" : ""}`;
  }
}

const NONCE_HASH_FLAW = "invalid new nonce hash";

/** One connection and handshake; resolves to the connected sender. */
async function connect(logger) {
  let failure = null;
  const sender = new MTProtoSender(new AuthKey(), {
    logger,
    retries: 1,
    autoReconnect: false,
    connectTimeout: 30,
    // MTProtoSender.connect reports failures here and resolves false.
    client: { _errorHandler: async (err) => { failure = err; } },
  });
  const Conn = transport === "abridged" ? ConnectionTCPAbridged : ConnectionTCPObfuscated;
  const connection = new Conn({
    ip: "127.0.0.1",
    port: Number(port),
    dcId: 2,
    loggers: logger,
    proxy: undefined,
    socket: scheme === "wss" ? SecureWebSockets : PromisedWebSockets,
    testServers: false,
  });
  if (!(await sender.connect(connection))) {
    throw failure || new Error("connect failed");
  }
  return sender;
}

async function main() {
  trustServerKey(fs.readFileSync(pemPath, "utf8"));
  const logger = new Logger("error");
  let sender;
  try {
    sender = await connect(logger);
  } catch (err) {
    if (!String(err && err.message).includes(NONCE_HASH_FLAW)) throw err;
    console.error(`gramjs-retry: ${err.message}`);
    sender = await connect(logger);
  }
  const pong = await sender.send(new Api.Ping({ pingId: bigInt(4242) }));
  console.log(`pong ${pong.pingId.toString()}`);
  await sender.disconnect();
}

const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 60000);
main().then(() => { clearTimeout(timer); process.exit(0); }, (err) => { console.error(err); process.exit(1); });
