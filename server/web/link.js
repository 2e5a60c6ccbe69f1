// The page at /s/<id>: opens the link with the key in its #fragment (never sent to the
// server), asks for the password if the link has one, then fetches, verifies and
// decrypts the file chunk by chunk into a stream that the browser saves as a download
// (through sw.js), so a file of several GiB is never held in memory.
import * as zk from './linkcrypto.js';

const $ = id => document.getElementById(id);
const AHEAD = 4;                    // chunks (1 MiB each) fetched and decrypted ahead of the save
const base = location.pathname.replace(/\/+$/, '');      // .../s/<id>: the link's endpoints are under it

class UserError extends Error {}

function say(text) { $('status').textContent = text; }

function fail(error) {
  const el = $('error');
  el.hidden = false;
  if (error instanceof zk.IntegrityError) {
    el.textContent = `This file failed verification (${error.message}): the server sent altered data. ` +
                     'Nothing was saved.';
  } else if (error instanceof UserError) {
    el.textContent = error.message;
  } else {
    el.textContent = `Could not open the link: ${error && error.message ? error.message : error}`;
  }
  $('save').disabled = true;
  say('');
}

function sizeText(n) {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} bytes`;
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// GET one of the link's endpoints: the fragment is never part of it. A 429 waits.
async function get(part) {
  for (let attempt = 0; ; attempt++) {
    const resp = await fetch(`${base}/${part}`, { cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer' });
    if (resp.ok) return resp;
    if (resp.status === 429 && attempt < 30) {
      await sleep(1000 * Math.max(1, Number(resp.headers.get('Retry-After')) || 1));
      continue;
    }
    if (resp.status === 410) throw new UserError('This link has expired or was revoked.');
    if (resp.status === 404 && part === 'record') throw new UserError('There is no such link on this server.');
    throw new UserError(`The server answered ${resp.status} for the link's ${part.split('/')[0]}.`);
  }
}

async function start() {
  if (!window.isSecureContext || !globalThis.crypto || !crypto.subtle) {
    throw new UserError('This page needs https: browsers decrypt only on secure pages.');
  }
  let secret, linkId;
  try {
    linkId = zk.b64urlDecode(base.split('/').pop(), zk.LINK_ID_BYTES, 'the link id');
    secret = zk.b64urlDecode(location.hash.slice(1), zk.LINK_SECRET_BYTES, 'the key after #');
  } catch (e) {
    throw new UserError(`This link is incomplete (${e.message}): was it cut off?`);
  }
  const { record } = await (await get('record')).json();
  let opened;
  try {
    opened = await zk.openRecord(secret, linkId, zk.b64Decode(record));
  } catch (e) {
    if (e instanceof zk.IntegrityError) {
      throw new UserError('This link does not open: its key is wrong (cut short or mistyped?), ' +
                          'or the server altered it.');
    }
    throw e;
  }
  if (opened.file) return ready(opened.file);
  say('');
  $('unlock').hidden = false;
  $('password').focus();
  $('unlock').addEventListener('submit', async event => {
    event.preventDefault();
    $('error').hidden = true;
    $('unlock-button').disabled = true;
    say('Checking the password…');
    try {
      const argon2id = await loadArgon2();
      const file = await zk.unlockRecord(secret, linkId, opened, $('password').value, argon2id);
      if (!file) {
        say('');
        $('error').hidden = false;
        $('error').textContent = 'Wrong password.';
        return;
      }
      $('unlock').hidden = true;
      ready(file);
    } catch (e) {
      fail(e);
    } finally {
      $('unlock-button').disabled = false;
    }
  });
}

// hash-wasm's Argon2id (installed from npm with the server), loaded only when needed.
function loadArgon2() {
  if (globalThis.hashwasm) return Promise.resolve(globalThis.hashwasm.argon2id);
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = 'static/argon2.js';
    script.onload = () => resolve(globalThis.hashwasm.argon2id);
    script.onerror = () => reject(new UserError('This server lacks the Argon2id library for passwords ' +
                                                '(its admin runs ./zkfs.sh setup).'));
    document.head.append(script);
  });
}

function ready(file) {
  say('');
  $('name').textContent = file.name;
  $('size').textContent = `(${sizeText(file.size)})`;
  $('file').hidden = false;
  $('save').addEventListener('click', () => {
    $('save').disabled = true;
    save(file).catch(fail);
  }, { once: true });
}

// The plaintext as a stream: each pull hands over the next verified chunk, with up to
// AHEAD chunks fetched and decrypted meanwhile (the save's pace sets the fetching's).
// ``progress(bytes, finished)``; a failed check errors the stream (the browser's
// download fails: nothing is saved) and is reported by ``onError``.
async function plaintext(file, progress, onError) {
  const fernet = await zk.Fernet.create(file.key);
  const manifest = file.manifest === null ? null
    : await zk.openManifest(fernet, new Uint8Array(await (await get('manifest')).arrayBuffer()), file);
  const count = manifest ? manifest.chunks.length : 0;
  const inflight = [];
  let next = 0;
  const chunk = async i => {
    if (manifest.isHole(i)) return new Uint8Array(manifest.chunkLength(i));
    const data = new Uint8Array(await (await get(`blobs/${zk.uuidText(manifest.chunks[i])}`)).arrayBuffer());
    return zk.openChunk(fernet, data, manifest.chunks[i], manifest.chunkLength(i));
  };
  return new ReadableStream({
    async pull(controller) {
      while (inflight.length < AHEAD && next < count) {
        const job = chunk(next++);
        job.catch(() => {});                 // reported once, when its turn comes
        inflight.push(job);
      }
      if (!inflight.length) {
        controller.close();
        progress(0, true);
        return;
      }
      try {
        const data = await inflight.shift();
        controller.enqueue(data);
        progress(data.length, false);
      } catch (e) {
        controller.error(e);
        onError(e);
      }
    },
  }, { highWaterMark: 1 });
}

async function save(file) {
  const bar = $('progress');
  bar.hidden = false;
  bar.max = Math.max(1, file.size);
  let got = 0;
  const ended = [];
  const end = () => ended.forEach(f => f());
  const stream = await plaintext(file, (n, finished) => {
    got += n;
    bar.value = got;
    $('done').textContent = finished
      ? `All ${got} bytes verified and decrypted; your browser saves ${file.name}.`
      : `${sizeText(got)} of ${sizeText(file.size)}`;
    if (finished) end();
  }, e => { end(); fail(e); });
  await streamToDisk(file, stream, f => ended.push(f));
}

// Hand the stream to the service worker, which answers a download request with it
// (Content-Disposition: attachment), so the browser writes it to disk as it comes.
// ``onEnd(f)``: f is called once the stream has ended.
async function streamToDisk(file, stream, onEnd) {
  if (!('serviceWorker' in navigator)) return saveInMemory(file, stream);
  const registration = await navigator.serviceWorker.register('static/sw.js', { scope: 'static/' });
  const worker = registration.active || await new Promise(resolve => {
    const w = registration.installing || registration.waiting;
    w.addEventListener('statechange', () => { if (w.state === 'activated') resolve(w); });
  });
  const token = zk.hex(crypto.getRandomValues(new Uint8Array(16)));
  const channel = new MessageChannel();
  const accepted = new Promise(resolve => { channel.port1.onmessage = resolve; });
  try {
    worker.postMessage({ type: 'save', token, name: file.name, size: file.size, stream }, [channel.port2, stream]);
  } catch (e) {
    return saveInMemory(file, stream);      // no transferable streams in this browser
  }
  await accepted;
  // A worker with no event for 30 s may be stopped, which would cut the stream.
  const keepAlive = setInterval(() => worker.postMessage({ type: 'ping' }), 10000);
  onEnd(() => clearInterval(keepAlive));
  const frame = document.createElement('iframe');
  frame.hidden = true;
  frame.src = `static/dl/${token}`;
  document.body.append(frame);
}

// Browsers without service workers: the whole file in memory, then saved.
async function saveInMemory(file, stream) {
  const blob = await new Response(stream).blob();
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = file.name;
  document.body.append(a);
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

start().catch(fail);
