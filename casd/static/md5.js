// Incremental MD5 over ArrayBuffers: casd's own code, no dependency.
//
// `new Md5().update(bytes).update(more).hex()` gives the same digest as Python's
// hashlib.md5 over the concatenation, whatever the slice boundaries. Lengths are JS numbers,
// so inputs beyond 4 GiB are counted exactly. The 64 steps are unrolled and written inline
// (helper functions per step measured 5x slower in V8: 100 vs 580 MB/s), and the message
// words are read straight from the caller's buffer through an aligned Int32Array view
// (unaligned input is first copied into an aligned scratch buffer, 64 KiB at a time).

import { BlockHash } from "./blocks.js";


// Runs the compression function over `blocks` 64-byte blocks of `w`, starting at word `i`.
function compress(h, w, i, blocks) {
  let a = h[0], b = h[1], c = h[2], d = h[3];
  for (const end = i + blocks * 16; i < end; i += 16) {
    const x0 = w[i], x1 = w[i + 1], x2 = w[i + 2], x3 = w[i + 3];
    const x4 = w[i + 4], x5 = w[i + 5], x6 = w[i + 6], x7 = w[i + 7];
    const x8 = w[i + 8], x9 = w[i + 9], x10 = w[i + 10], x11 = w[i + 11];
    const x12 = w[i + 12], x13 = w[i + 13], x14 = w[i + 14], x15 = w[i + 15];
    const a0 = a, b0 = b, c0 = c, d0 = d;
    a = (a + ((b & c) | (~b & d)) + x0 + -0x28955b88) | 0; a = (((a << 7) | (a >>> 25)) + b) | 0;
    d = (d + ((a & b) | (~a & c)) + x1 + -0x173848aa) | 0; d = (((d << 12) | (d >>> 20)) + a) | 0;
    c = (c + ((d & a) | (~d & b)) + x2 + 0x242070db) | 0; c = (((c << 17) | (c >>> 15)) + d) | 0;
    b = (b + ((c & d) | (~c & a)) + x3 + -0x3e423112) | 0; b = (((b << 22) | (b >>> 10)) + c) | 0;
    a = (a + ((b & c) | (~b & d)) + x4 + -0x0a83f051) | 0; a = (((a << 7) | (a >>> 25)) + b) | 0;
    d = (d + ((a & b) | (~a & c)) + x5 + 0x4787c62a) | 0; d = (((d << 12) | (d >>> 20)) + a) | 0;
    c = (c + ((d & a) | (~d & b)) + x6 + -0x57cfb9ed) | 0; c = (((c << 17) | (c >>> 15)) + d) | 0;
    b = (b + ((c & d) | (~c & a)) + x7 + -0x02b96aff) | 0; b = (((b << 22) | (b >>> 10)) + c) | 0;
    a = (a + ((b & c) | (~b & d)) + x8 + 0x698098d8) | 0; a = (((a << 7) | (a >>> 25)) + b) | 0;
    d = (d + ((a & b) | (~a & c)) + x9 + -0x74bb0851) | 0; d = (((d << 12) | (d >>> 20)) + a) | 0;
    c = (c + ((d & a) | (~d & b)) + x10 + -0x0000a44f) | 0; c = (((c << 17) | (c >>> 15)) + d) | 0;
    b = (b + ((c & d) | (~c & a)) + x11 + -0x76a32842) | 0; b = (((b << 22) | (b >>> 10)) + c) | 0;
    a = (a + ((b & c) | (~b & d)) + x12 + 0x6b901122) | 0; a = (((a << 7) | (a >>> 25)) + b) | 0;
    d = (d + ((a & b) | (~a & c)) + x13 + -0x02678e6d) | 0; d = (((d << 12) | (d >>> 20)) + a) | 0;
    c = (c + ((d & a) | (~d & b)) + x14 + -0x5986bc72) | 0; c = (((c << 17) | (c >>> 15)) + d) | 0;
    b = (b + ((c & d) | (~c & a)) + x15 + 0x49b40821) | 0; b = (((b << 22) | (b >>> 10)) + c) | 0;
    a = (a + ((b & d) | (c & ~d)) + x1 + -0x09e1da9e) | 0; a = (((a << 5) | (a >>> 27)) + b) | 0;
    d = (d + ((a & c) | (b & ~c)) + x6 + -0x3fbf4cc0) | 0; d = (((d << 9) | (d >>> 23)) + a) | 0;
    c = (c + ((d & b) | (a & ~b)) + x11 + 0x265e5a51) | 0; c = (((c << 14) | (c >>> 18)) + d) | 0;
    b = (b + ((c & a) | (d & ~a)) + x0 + -0x16493856) | 0; b = (((b << 20) | (b >>> 12)) + c) | 0;
    a = (a + ((b & d) | (c & ~d)) + x5 + -0x29d0efa3) | 0; a = (((a << 5) | (a >>> 27)) + b) | 0;
    d = (d + ((a & c) | (b & ~c)) + x10 + 0x02441453) | 0; d = (((d << 9) | (d >>> 23)) + a) | 0;
    c = (c + ((d & b) | (a & ~b)) + x15 + -0x275e197f) | 0; c = (((c << 14) | (c >>> 18)) + d) | 0;
    b = (b + ((c & a) | (d & ~a)) + x4 + -0x182c0438) | 0; b = (((b << 20) | (b >>> 12)) + c) | 0;
    a = (a + ((b & d) | (c & ~d)) + x9 + 0x21e1cde6) | 0; a = (((a << 5) | (a >>> 27)) + b) | 0;
    d = (d + ((a & c) | (b & ~c)) + x14 + -0x3cc8f82a) | 0; d = (((d << 9) | (d >>> 23)) + a) | 0;
    c = (c + ((d & b) | (a & ~b)) + x3 + -0x0b2af279) | 0; c = (((c << 14) | (c >>> 18)) + d) | 0;
    b = (b + ((c & a) | (d & ~a)) + x8 + 0x455a14ed) | 0; b = (((b << 20) | (b >>> 12)) + c) | 0;
    a = (a + ((b & d) | (c & ~d)) + x13 + -0x561c16fb) | 0; a = (((a << 5) | (a >>> 27)) + b) | 0;
    d = (d + ((a & c) | (b & ~c)) + x2 + -0x03105c08) | 0; d = (((d << 9) | (d >>> 23)) + a) | 0;
    c = (c + ((d & b) | (a & ~b)) + x7 + 0x676f02d9) | 0; c = (((c << 14) | (c >>> 18)) + d) | 0;
    b = (b + ((c & a) | (d & ~a)) + x12 + -0x72d5b376) | 0; b = (((b << 20) | (b >>> 12)) + c) | 0;
    a = (a + (b ^ c ^ d) + x5 + -0x0005c6be) | 0; a = (((a << 4) | (a >>> 28)) + b) | 0;
    d = (d + (a ^ b ^ c) + x8 + -0x788e097f) | 0; d = (((d << 11) | (d >>> 21)) + a) | 0;
    c = (c + (d ^ a ^ b) + x11 + 0x6d9d6122) | 0; c = (((c << 16) | (c >>> 16)) + d) | 0;
    b = (b + (c ^ d ^ a) + x14 + -0x021ac7f4) | 0; b = (((b << 23) | (b >>> 9)) + c) | 0;
    a = (a + (b ^ c ^ d) + x1 + -0x5b4115bc) | 0; a = (((a << 4) | (a >>> 28)) + b) | 0;
    d = (d + (a ^ b ^ c) + x4 + 0x4bdecfa9) | 0; d = (((d << 11) | (d >>> 21)) + a) | 0;
    c = (c + (d ^ a ^ b) + x7 + -0x0944b4a0) | 0; c = (((c << 16) | (c >>> 16)) + d) | 0;
    b = (b + (c ^ d ^ a) + x10 + -0x41404390) | 0; b = (((b << 23) | (b >>> 9)) + c) | 0;
    a = (a + (b ^ c ^ d) + x13 + 0x289b7ec6) | 0; a = (((a << 4) | (a >>> 28)) + b) | 0;
    d = (d + (a ^ b ^ c) + x0 + -0x155ed806) | 0; d = (((d << 11) | (d >>> 21)) + a) | 0;
    c = (c + (d ^ a ^ b) + x3 + -0x2b10cf7b) | 0; c = (((c << 16) | (c >>> 16)) + d) | 0;
    b = (b + (c ^ d ^ a) + x6 + 0x04881d05) | 0; b = (((b << 23) | (b >>> 9)) + c) | 0;
    a = (a + (b ^ c ^ d) + x9 + -0x262b2fc7) | 0; a = (((a << 4) | (a >>> 28)) + b) | 0;
    d = (d + (a ^ b ^ c) + x12 + -0x1924661b) | 0; d = (((d << 11) | (d >>> 21)) + a) | 0;
    c = (c + (d ^ a ^ b) + x15 + 0x1fa27cf8) | 0; c = (((c << 16) | (c >>> 16)) + d) | 0;
    b = (b + (c ^ d ^ a) + x2 + -0x3b53a99b) | 0; b = (((b << 23) | (b >>> 9)) + c) | 0;
    a = (a + (c ^ (b | ~d)) + x0 + -0x0bd6ddbc) | 0; a = (((a << 6) | (a >>> 26)) + b) | 0;
    d = (d + (b ^ (a | ~c)) + x7 + 0x432aff97) | 0; d = (((d << 10) | (d >>> 22)) + a) | 0;
    c = (c + (a ^ (d | ~b)) + x14 + -0x546bdc59) | 0; c = (((c << 15) | (c >>> 17)) + d) | 0;
    b = (b + (d ^ (c | ~a)) + x5 + -0x036c5fc7) | 0; b = (((b << 21) | (b >>> 11)) + c) | 0;
    a = (a + (c ^ (b | ~d)) + x12 + 0x655b59c3) | 0; a = (((a << 6) | (a >>> 26)) + b) | 0;
    d = (d + (b ^ (a | ~c)) + x3 + -0x70f3336e) | 0; d = (((d << 10) | (d >>> 22)) + a) | 0;
    c = (c + (a ^ (d | ~b)) + x10 + -0x00100b83) | 0; c = (((c << 15) | (c >>> 17)) + d) | 0;
    b = (b + (d ^ (c | ~a)) + x1 + -0x7a7ba22f) | 0; b = (((b << 21) | (b >>> 11)) + c) | 0;
    a = (a + (c ^ (b | ~d)) + x8 + 0x6fa87e4f) | 0; a = (((a << 6) | (a >>> 26)) + b) | 0;
    d = (d + (b ^ (a | ~c)) + x15 + -0x01d31920) | 0; d = (((d << 10) | (d >>> 22)) + a) | 0;
    c = (c + (a ^ (d | ~b)) + x6 + -0x5cfebcec) | 0; c = (((c << 15) | (c >>> 17)) + d) | 0;
    b = (b + (d ^ (c | ~a)) + x13 + 0x4e0811a1) | 0; b = (((b << 21) | (b >>> 11)) + c) | 0;
    a = (a + (c ^ (b | ~d)) + x4 + -0x08ac817e) | 0; a = (((a << 6) | (a >>> 26)) + b) | 0;
    d = (d + (b ^ (a | ~c)) + x11 + -0x42c50dcb) | 0; d = (((d << 10) | (d >>> 22)) + a) | 0;
    c = (c + (a ^ (d | ~b)) + x2 + 0x2ad7d2bb) | 0; c = (((c << 15) | (c >>> 17)) + d) | 0;
    b = (b + (d ^ (c | ~a)) + x9 + -0x14792c6f) | 0; b = (((b << 21) | (b >>> 11)) + c) | 0;
    a = (a + a0) | 0; b = (b + b0) | 0; c = (c + c0) | 0; d = (d + d0) | 0;
  }
  h[0] = a; h[1] = b; h[2] = c; h[3] = d;
}


export class Md5 extends BlockHash {
  constructor() {
    super("Md5", new Int32Array([0x67452301, 0xefcdab89 | 0, 0x98badcfe | 0, 0x10325476]), compress);
  }

  _writeBitLength(bits) { // little-endian, low word first
    this._blockWords[14] = bits % 0x100000000 | 0;
    this._blockWords[15] = Math.floor(bits / 0x100000000) | 0;
  }

  _stateHex() {
    return toHex(new Uint8Array(this._h.buffer));
  }
}

function toHex(bytes) {
  let s = "";
  for (const b of bytes) s += (b < 16 ? "0" : "") + b.toString(16);
  return s;
}

/** MD5 of one buffer, as lowercase hex. */
export function md5Hex(data) {
  return new Md5().update(data).hex();
}
