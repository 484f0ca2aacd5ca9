// The 64-byte block buffering that MD5 and SHA-256 share (both are Merkle–Damgård hashes
// over 64-byte blocks): whole blocks of 4-byte-aligned input go straight to the compression
// function through an Int32Array view; unaligned input is first copied into an aligned
// scratch buffer, 64 KiB at a time; a partial block waits in the hasher for more bytes.

const SCRATCH_BLOCKS = 1024; // 64 KiB of aligned scratch for unaligned input
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** The bytes of an ArrayBuffer or typed array view, without copying. */
export function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("update expects an ArrayBuffer or a typed array view");
}

/**
 * Feeds `bytes` to hasher state `s` ({_h, _block, _blockWords, _blockLen, _length,
 * _scratch}), calling `compress(h, words, offset, blocks)` for every complete block.
 */
export function feed(s, bytes, compress) {
  const n = bytes.length;
  s._length += n;
  let pos = 0;
  if (s._blockLen > 0) {
    pos = Math.min(64 - s._blockLen, n);
    s._block.set(bytes.subarray(0, pos), s._blockLen);
    s._blockLen += pos;
    if (s._blockLen < 64) return;
    compress(s._h, s._blockWords, 0, 1);
    s._blockLen = 0;
  }
  let blocks = Math.floor((n - pos) / 64);
  if (blocks > 0) {
    const start = bytes.byteOffset + pos;
    if (start % 4 === 0) {
      compress(s._h, new Int32Array(bytes.buffer, start, blocks * 16), 0, blocks);
      pos += blocks * 64;
    } else {
      s._scratch ??= new Uint8Array(SCRATCH_BLOCKS * 64);
      const words = new Int32Array(s._scratch.buffer);
      while (blocks > 0) {
        const k = Math.min(blocks, SCRATCH_BLOCKS);
        s._scratch.set(bytes.subarray(pos, pos + k * 64));
        compress(s._h, words, 0, k);
        pos += k * 64;
        blocks -= k;
      }
    }
  }
  if (pos < n) {
    s._block.set(bytes.subarray(pos), 0);
    s._blockLen = n - pos;
  }
}

/**
 * An incremental 64-byte-block hash: subclasses give the initial state, the compression
 * function, how the message length is written into the last block, and the digest's hex.
 */
export class BlockHash {
  constructor(name, h, compress) {
    if (!LITTLE_ENDIAN) throw new Error(`casd ${name} needs a little-endian platform`);
    this._name = name;
    this._h = h;
    this._compress = compress;
    this._block = new Uint8Array(64);
    this._blockWords = new Int32Array(this._block.buffer);
    this._blockLen = 0;
    this._length = 0; // bytes fed so far
    this._scratch = null;
    this._done = null;
  }

  /** Feeds more bytes; returns this. */
  update(data) {
    if (this._done !== null) throw new Error(`${this._name}.update after hex()`);
    feed(this, asBytes(data), this._compress);
    return this;
  }

  /** The digest as lowercase hex; the hasher accepts no more input. */
  hex() {
    if (this._done === null) {
      const block = this._block;
      block[this._blockLen] = 0x80;
      block.fill(0, this._blockLen + 1);
      if (this._blockLen >= 56) {
        this._compress(this._h, this._blockWords, 0, 1);
        block.fill(0);
      }
      this._writeBitLength(this._length * 8); // exact: lengths stay far below 2**53 / 8
      this._compress(this._h, this._blockWords, 0, 1);
      this._done = this._stateHex();
    }
    return this._done;
  }
}
