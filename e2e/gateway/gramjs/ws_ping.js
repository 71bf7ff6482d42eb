// GramJS (the `telegram` npm package) as a real WebSocket client: trusts the
// gateway's RSA key, runs the handshake over ws://HOST:PORT/apiws and sends
// ping. Usage: node ws_ping.js GRAMJS_DIR PORT PUBLIC_KEY_PEM TRANSPORT [wss]
// (TRANSPORT: obfuscated | abridged; `wss`: TLS on any port, trusting the CA
// in NODE_EXTRA_CA_CERTS). Prints "pong <ping_id>" on success.
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

async function main() {
  trustServerKey(fs.readFileSync(pemPath, "utf8"));
  const logger = new Logger("error");
  const sender = new MTProtoSender(new AuthKey(), {
    logger,
    retries: 1,
    autoReconnect: false,
    connectTimeout: 30,
    client: { _errorHandler: null },
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
  await sender.connect(connection);
  const pong = await sender.send(new Api.Ping({ pingId: bigInt(4242) }));
  console.log(`pong ${pong.pingId.toString()}`);
  await sender.disconnect();
}

const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 60000);
main().then(() => { clearTimeout(timer); process.exit(0); }, (err) => { console.error(err); process.exit(1); });
