// Saves a stream as a download (link.js): the page posts the decrypted file's stream,
// then opens static/dl/<token>; the answer is that stream, as an attachment, which the
// browser writes to disk as it arrives. Nothing here reaches the network.
const waiting = new Map();          // token -> {name, size, stream}

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', event => event.waitUntil(self.clients.claim()));

self.addEventListener('message', event => {
  const d = event.data;
  if (!d || d.type !== 'save' || !/^[0-9a-f]{32}$/.test(d.token)) return;   // pings keep this worker alive
  waiting.set(d.token, d);
  event.ports[0].postMessage('ready');
});

// RFC 6266 / 5987: the name in UTF-8, with an ASCII stand-in for old browsers.
function disposition(name) {
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, '_');
  const utf8 = encodeURIComponent(name).replace(/['()*]/g, c => '%' + c.charCodeAt(0).toString(16).toUpperCase());
  return `attachment; filename="${ascii}"; filename*=UTF-8''${utf8}`;
}

self.addEventListener('fetch', event => {
  const m = /\/static\/dl\/([0-9a-f]{32})$/.exec(new URL(event.request.url).pathname);
  if (!m) return;
  const d = waiting.get(m[1]);
  waiting.delete(m[1]);
  if (!d) {
    event.respondWith(new Response('This download is no longer available: open the link again.',
                                   { status: 404, headers: { 'Content-Type': 'text/plain; charset=utf-8' } }));
    return;
  }
  event.respondWith(new Response(d.stream, { headers: {
    'Content-Type': 'application/octet-stream',
    'Content-Disposition': disposition(d.name),
    'Content-Length': String(d.size),
    'X-Content-Type-Options': 'nosniff',
  } }));
});
