// The 64-byte block buffering that MD5 and SHA-256 share (both are Merkle–Damgård hashes
// over 64-byte blocks): whole blocks of 4-byte-aligned input go straight to the compression
// function through an Int32Array view; unaligned input is first copied into an aligned
// scratch buffer, 64 KiB at a time; a partial block waits in the hasher for more bytes.

const SCRATCH_BLOCKS = 1024; // 64 KiB of aligned scratch for unaligned input

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
