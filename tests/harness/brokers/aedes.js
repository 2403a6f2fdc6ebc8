'use strict'
// The interop matrix's aedes broker (tests/harness/src/brokers.rs): aedes 0.51
// on loopback listeners, as scripts/install-test-deps.sh installs it.
// Flags: --host --port (0 = ephemeral) --tls-port --cert --key --ca
// --require-client-cert --max-packet-size (whole packet, bytes); each also as
// AEDES_<FLAG> in the environment (AEDES_REQUIRE_CLIENT_CERT=1).
// Prints "ready <port> <tlsport|->". Needs NODE_PATH=<prefix>/node_modules.
const net = require('net'), tls = require('tls'), fs = require('fs')
const Aedes = require(process.env.AEDES_MODULE || 'aedes')
const a = {}, argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  const m = /^--([a-z-]+)(?:=(.*))?$/.exec(argv[i])
  if (!m) { console.error('bad arg: ' + argv[i]); process.exit(2) }
  a[m[1]] = m[1] === 'require-client-cert' ? '1' : (m[2] !== undefined ? m[2] : argv[++i])
}
const opt = (k) => a[k] !== undefined ? a[k] : process.env['AEDES_' + k.toUpperCase().replace(/-/g, '_')]
const host = opt('host') || '127.0.0.1', maxPacketSize = Number(opt('max-packet-size') || 0)
const broker = Aedes()
broker.on('clientError', (c, err) => console.error(`clientError ${c && c.id}: ${err.message}`))
broker.on('connectionError', (c, err) => console.error(`connectionError: ${err.message}`))
// aedes 0.51 / mqtt-packet 9 have no max packet size option: check the fixed header in the
// client's parser (before the payload is buffered); the parser error makes aedes close the socket.
function handle (conn) {
  const client = broker.handle(conn)
  if (maxPacketSize > 0) {
    const p = client._parser, orig = p._parseLength
    p._parseLength = function () {
      const before = this._list.length, ok = orig.call(this)
      const total = ok && 1 + (before - this._list.length) + this.packet.length
      if (!ok || total <= maxPacketSize) return ok
      this._emitError(new Error(`packet too large: ${total} > ${maxPacketSize}`))
      return false
    }
  }
  return client
}
const servers = []
const listen = (server, port) => new Promise((resolve, reject) => {
  servers.push(server)
  server.once('error', reject)
  server.listen(Number(port || 0), host, () => resolve(server.address().port))
})
async function main () {
  const plainPort = await listen(net.createServer(handle), opt('port'))
  let tlsPort = '-'
  if (opt('tls-port')) {
    const req = opt('require-client-cert') === '1'
    const o = { cert: fs.readFileSync(opt('cert')), key: fs.readFileSync(opt('key')), requestCert: req, rejectUnauthorized: req }
    if (opt('ca')) o.ca = fs.readFileSync(opt('ca'))
    const s = tls.createServer(o, handle)
    s.on('tlsClientError', (err) => console.error(`tlsClientError: ${err.message}`))
    tlsPort = await listen(s, opt('tls-port'))
  }
  process.stdout.write(`ready ${plainPort} ${tlsPort}\n`)
}
let stopping = false
function shutdown () {
  if (stopping) return
  stopping = true
  setTimeout(() => process.exit(0), 2000).unref()
  for (const s of servers) s.close()
  broker.close(() => process.exit(0))
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
main().catch((err) => { console.error(`fatal: ${err.message}`); process.exit(1) })
