// The link format in the browser (docs/FORMAT.md §1, §3, §8), with WebCrypto: the same
// binary Fernet tokens (AES-128-CBC + HMAC-SHA256), 64 KiB segments, manifest and
// link record as zkfs/crypto.py, zkfs/format.py and zkfs/linkformat.py. Every check
// the command-line client makes is made here too; a failed one throws IntegrityError.

export class IntegrityError extends Error {}

const subtle = globalThis.crypto && globalThis.crypto.subtle;
const utf8 = new TextEncoder();
const SEGMENT_SIZE = 65536;
const SEGMENT_HEAD = 20;                        // blob id (16 B) ‖ segment index (u32)
const HOLE = '00000000000000000000000000000000';
export const LINK_SECRET_BYTES = 16;
export const LINK_ID_BYTES = 16;
const RECORD_VERSION = 1;
// What this page accepts of a link's Argon2id parameters (zkfs/crypto.py KdfParams.weakness).
const KDF = { minMemory: 64 * 1024, maxMemory: 4 * 1024 * 1024, minPasses: 3, maxPasses: 64,
              minSalt: 16, maxSalt: 64, maxLanes: 16 };

// ---------------------------------------------------------------- encodings
export function b64urlDecode(text, size, what) {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) throw new Error(`${what} is not base64url`);
  const bytes = b64Decode(text.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - text.length % 4) % 4));
  if (size !== undefined && bytes.length !== size) throw new Error(`${what} has ${bytes.length} bytes, not ${size}`);
  return bytes;
}

export function b64Decode(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function hex(bytes) {
  return Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('');
}

export function uuidText(bytes) {
  const h = hex(bytes);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function uuidBytes(text) {
  if (typeof text !== 'string' || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(text)) {
    throw new IntegrityError('the link\'s record is malformed');
  }
  return Uint8Array.from(text.replace(/-/g, '').match(/../g), h => parseInt(h, 16));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

// ---------------------------------------------------------------- keys
// HKDF-SHA256, empty salt, info "zkfs/v1/<label>" ‖ 0x00 ‖ link id (crypto._link_key).
async function linkKey(ikm, label, linkId) {
  const base = await subtle.importKey('raw', ikm, 'HKDF', false, ['deriveBits']);
  const info = concat(utf8.encode(`zkfs/v1/${label}`), new Uint8Array([0]), linkId);
  return new Uint8Array(await subtle.deriveBits({ name: 'HKDF', hash: 'SHA-256', salt: new Uint8Array(0), info },
                                                base, 256));
}

// ---------------------------------------------------------------- binary Fernet
export class Fernet {
  static async create(key) {
    if (key.length !== 32) throw new IntegrityError('a Fernet key is 32 bytes');
    const f = new Fernet();
    f.mac = await subtle.importKey('raw', key.subarray(0, 16), { name: 'HMAC', hash: 'SHA-256' }, false, ['verify']);
    f.aes = await subtle.importKey('raw', key.subarray(16), { name: 'AES-CBC' }, false, ['decrypt']);
    return f;
  }

  // The HMAC is checked before anything is decrypted.
  async decrypt(token) {
    const n = token.length;
    if (n < 25 + 16 + 32 || (n - 57) % 16 || token[0] !== 0x80) throw new IntegrityError('malformed token');
    if (!await subtle.verify('HMAC', this.mac, token.subarray(n - 32), token.subarray(0, n - 32))) {
      throw new IntegrityError('authentication failed');
    }
    try {
      return new Uint8Array(await subtle.decrypt({ name: 'AES-CBC', iv: token.subarray(9, 25) }, this.aes,
                                                 token.subarray(25, n - 32)));
    } catch (e) {
      throw new IntegrityError('bad padding');
    }
  }
}

function sealedSize(n) { return 25 + 16 * (Math.floor(n / 16) + 1) + 32; }
function segmentTokenSize(n) { return sealedSize(SEGMENT_HEAD + n); }

// ---------------------------------------------------------------- the record (§8)
function parseFile(doc) {
  const bad = () => new IntegrityError('the link\'s record is malformed');
  if (!doc || typeof doc !== 'object') throw bad();
  const { name, size, inode, key, manifest, mtime } = doc;
  const nameBytes = typeof name === 'string' ? utf8.encode(name).length : 0;
  if (!nameBytes || nameBytes > 255 || /[/\0]/.test(name) || name === '.' || name === '..') throw bad();
  if (!Number.isSafeInteger(size) || size < 0 || size > 2 ** 38 || typeof mtime !== 'number') throw bad();
  if (manifest !== null && !(typeof manifest === 'string' && /^[0-9a-f]{64}$/.test(manifest))) throw bad();
  if (manifest === null && size !== 0) throw bad();
  let keyBytes;
  try { keyBytes = b64Decode(key); } catch (e) { throw bad(); }
  if (keyBytes.length !== 32) throw bad();
  return { name, size, inode: uuidBytes(inode), key: keyBytes, manifest };
}

function parseJson(bytes) {
  try { return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes)); }
  catch (e) { throw new IntegrityError('the link\'s record is malformed'); }
}

// {file} or, for a link with a password, {kdf, sealed}: IntegrityError if the record was
// not sealed for this link with this secret (a wrong key, or the server altered it).
export async function openRecord(secret, linkId, token) {
  const fernet = await Fernet.create(await linkKey(secret, 'link-record', linkId));
  const doc = parseJson(await fernet.decrypt(token));
  if (!doc || doc.v !== RECORD_VERSION) throw new IntegrityError('the link\'s record has an unknown version');
  if (doc.file) return { file: parseFile(doc.file) };
  const k = doc.kdf || {};
  let salt, sealed;
  try { salt = b64Decode(k.salt); sealed = b64Decode(doc.sealed); }
  catch (e) { throw new IntegrityError('the link\'s record is malformed'); }
  const kdf = { salt, memory: k.memory_kib, passes: k.iterations, lanes: k.lanes };
  const ok = Number.isInteger(kdf.memory) && kdf.memory >= KDF.minMemory && kdf.memory <= KDF.maxMemory
    && Number.isInteger(kdf.passes) && kdf.passes >= KDF.minPasses && kdf.passes <= KDF.maxPasses
    && salt.length >= KDF.minSalt && salt.length <= KDF.maxSalt
    && Number.isInteger(kdf.lanes) && kdf.lanes >= 1 && kdf.lanes <= KDF.maxLanes;
  if (!ok) throw new IntegrityError('the link asks for Argon2id parameters outside what this page accepts');
  return { kdf, sealed };
}

// The file a password-protected record holds; null for a wrong password. ``argon2id``
// is hash-wasm's.
export async function unlockRecord(secret, linkId, locked, password, argon2id) {
  const root = await argon2id({ password, salt: locked.kdf.salt, parallelism: locked.kdf.lanes,
                                iterations: locked.kdf.passes, memorySize: locked.kdf.memory,
                                hashLength: 32, outputType: 'binary' });
  const fernet = await Fernet.create(await linkKey(concat(secret, root), 'link-content', linkId));
  let plain;
  try { plain = await fernet.decrypt(locked.sealed); } catch (e) { return null; }
  return parseFile(parseJson(plain));
}

// ---------------------------------------------------------------- content (§3)
// The manifest the record names (by digest), checked like the client does.
export async function openManifest(fernet, token, file) {
  const digest = new Uint8Array(await subtle.digest('SHA-256', token));
  if (hex(digest) !== file.manifest) throw new IntegrityError('the server sent another manifest than the one the link names');
  const plain = await fernet.decrypt(token);
  const view = new DataView(plain.buffer, plain.byteOffset, plain.byteLength);
  if (plain.length < 36 || !equal(plain.subarray(0, 4), utf8.encode('ZKM2')) || !equal(plain.subarray(4, 20), file.inode)) {
    throw new IntegrityError('the manifest belongs to another file');
  }
  const size = Number(view.getBigUint64(20));
  const chunkSize = view.getUint32(28);
  const count = view.getUint32(32);
  if (!chunkSize || plain.length !== 36 + 16 * count || count !== Math.ceil(size / chunkSize)) {
    throw new IntegrityError('manifest length mismatch');
  }
  if (size !== file.size) throw new IntegrityError('the manifest disagrees with the link\'s record about the size');
  const chunks = [];
  for (let i = 0; i < count; i++) chunks.push(plain.slice(36 + 16 * i, 52 + 16 * i));
  return {
    size, chunkSize, chunks,
    chunkLength: i => Math.max(0, Math.min(chunkSize, size - i * chunkSize)),
    isHole: i => hex(chunks[i]) === HOLE,
  };
}

// A whole chunk's plaintext, after checking each segment is the one of this chunk
// (its blob id) at its index, with the length the manifest implies (format.open_segments).
export async function openChunk(fernet, data, blobId, chunkLength) {
  const m = Math.ceil(chunkLength / SEGMENT_SIZE);
  const full = segmentTokenSize(SEGMENT_SIZE);
  if (!m || data.length !== (m - 1) * full + segmentTokenSize(chunkLength - (m - 1) * SEGMENT_SIZE)) {
    throw new IntegrityError('chunk has the wrong length');
  }
  const out = new Uint8Array(chunkLength);
  await Promise.all(Array.from({ length: m }, async (_, j) => {
    const want = Math.min(SEGMENT_SIZE, chunkLength - j * SEGMENT_SIZE);
    const plain = await fernet.decrypt(data.subarray(j * full, j * full + segmentTokenSize(want)));
    const head = new DataView(plain.buffer, plain.byteOffset, plain.byteLength);
    if (plain.length !== SEGMENT_HEAD + want || !equal(plain.subarray(0, 16), blobId) || head.getUint32(16) !== j) {
      throw new IntegrityError('chunk segment does not belong here');
    }
    out.set(plain.subarray(SEGMENT_HEAD), j * SEGMENT_SIZE);
  }));
  return out;
}
