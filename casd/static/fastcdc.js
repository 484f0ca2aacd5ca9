// FastCDC 2020 content-defined chunking: casd's own code, no dependency, no build step.
//
// Cuts exactly where casd/chunking.py (pyfastcdc) cuts for the same bytes and parameters:
// REAPI's FastCdc2020Params (normalization level 2, min = avg / 4, max = avg * 4, the gear
// table GEAR[i] = first 8 bytes, big-endian, of MD5 of 64 bytes of value i, XORed with a
// 32-bit seed). It is incremental: feed a file in slices of any size (the hashing worker
// reads 8 MiB at a time) and get back the chunk ends as they are found.
//
//   const cdc = new FastCdc({ avgSize: 512 * 1024, size: file.size });
//   for (const slice of slices) ends.push(...cdc.update(slice));
//   ends.push(...cdc.finish());   // chunk i is [ends[i-1] (or 0), ends[i])
//
// With `size` (the input's total length) every end is final the moment update() returns
// it, and the update that brings the last byte also returns the last end. Without it, one
// end may wait for the next update() or finish() (see `_held`).
//
// The 64-bit gear hash is kept as two int32 halves (BigInt is far slower, a double cannot
// hold 64 bits), and the carry between them is computed without a branch: on random data
// a branch on it mispredicts half the time. A byte at chunk index i (0-based) is hashed only from
// i = min on: h = (h << 1) + GEAR[byte]; a cut "at i" (h & mask == 0) ends the chunk
// before that byte, as in the reference crate; mask_s applies while i < avg, mask_l
// after, and a chunk that reaches max bytes is cut there.

import { Md5 } from "./md5.js";

export const NORMALIZATION = 2;
export const MIN_AVG = 1024;
export const MAX_AVG = 4 * 1024 * 1024;
// As casd.chunking.DEFAULT_FASTCDC_AVG (docs/chunking.md says why 1 MiB).
export const DEFAULT_AVG = 1024 * 1024;

// The C reference's masks by log2 of the average size, as [high, low] 32-bit words; level 2
// normalization uses MASKS[bits + 2] before the average and MASKS[bits - 2] after it.
const MASKS = [
  [0x00000000, 0x00000000], [0x00000000, 0x00000000], [0x00000000, 0x00000000],
  [0x00000000, 0x00000000], [0x00000000, 0x00000000], [0x00000000, 0x01804110],
  [0x00000000, 0x01803110], [0x00000000, 0x18035100], [0x00000018, 0x00035300],
  [0x00000190, 0x00353000], [0x00005900, 0x03530000], [0x0000d900, 0x03530000],
  [0x0000d901, 0x03530000], [0x0000d903, 0x03530000], [0x0000d903, 0x13530000],
  [0x0000d90f, 0x03530000], [0x0000d903, 0x03537000], [0x0000d907, 0x03537000],
  [0x0000d907, 0x07537000], [0x0000d917, 0x07537000], [0x0000d917, 0x47537000],
  [0x0000d917, 0x67537000], [0x0000d937, 0x67537000], [0x0000d937, 0x77537000],
  [0x0000d937, 0x77577000], [0x0000db37, 0x77577000],
];

let gearHex = null;

// The 256 gear values, derived rather than transcribed: high and low words as hex.
function gearTable() {
  if (gearHex === null) {
    gearHex = [];
    for (let i = 0; i < 256; i++) gearHex.push(new Md5().update(new Uint8Array(64).fill(i)).hex());
  }
  return gearHex;
}

/** {minSize, avgSize, maxSize} for an average; throws RangeError on a bad one. */
export function fastcdcParams(avgSize = DEFAULT_AVG) {
  if (!Number.isInteger(avgSize) || avgSize < MIN_AVG || avgSize > MAX_AVG ||
      (avgSize & (avgSize - 1)) !== 0) {
    throw new RangeError(
      `a FastCDC average must be a power of two from ${MIN_AVG} to ${MAX_AVG} bytes, got ${avgSize}`,
    );
  }
  return { minSize: avgSize / 4, avgSize, maxSize: avgSize * 4 };
}

function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("update expects an ArrayBuffer or a typed array view");
}

/** Incremental FastCDC 2020 over a byte stream fed in slices of any size. */
export class FastCdc {
  constructor({ avgSize = DEFAULT_AVG, seed = 0, size } = {}) {
    const { minSize, maxSize } = fastcdcParams(avgSize);
    if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
      throw new RangeError(`a FastCDC seed is a 32-bit unsigned integer, got ${seed}`);
    }
    if (size !== undefined && !(Number.isSafeInteger(size) && size >= 0)) {
      throw new RangeError(`size must be a non-negative integer, got ${size}`);
    }
    this.size = size === undefined ? -1 : size;
    this.minSize = minSize;
    this.avgSize = avgSize;
    this.maxSize = maxSize;
    this.seed = seed;
    const bits = Math.round(Math.log2(avgSize));
    [this._maskSHi, this._maskSLo] = MASKS[bits + NORMALIZATION].map((w) => w | 0);
    [this._maskLHi, this._maskLLo] = MASKS[bits - NORMALIZATION].map((w) => w | 0);
    this._gearHi = new Int32Array(256);
    this._gearLo = new Int32Array(256);
    gearTable().forEach((hex, i) => {
      this._gearHi[i] = parseInt(hex.slice(0, 8), 16) | 0;
      this._gearLo[i] = parseInt(hex.slice(8, 16), 16) ^ seed;
    });
    this._chunkStart = 0; // absolute offset of the current chunk
    this._i = 0; // bytes of the current chunk seen so far
    this._hi = 0; // gear hash of the current chunk, high and low words (int32)
    this._lo = 0;
    // A cut found on the last byte fed, at an even chunk index, stands only if more than
    // that one byte follows: at the end of input the reference leaves an odd tail's last
    // byte untested. Without `size`, held here until the next update() or finish() decides.
    this._held = -1;
    this._done = false;
  }

  /** Feeds the next bytes; returns the absolute end offsets of the chunks they complete. */
  update(data) {
    if (this._done) throw new Error("FastCdc.update after finish()");
    const bytes = asBytes(data);
    const n = bytes.length;
    const ends = [];
    if (n === 0) return ends;
    if (this.size >= 0 && this._chunkStart + this._i + n > this.size) {
      throw new Error(`FastCdc was told the input is ${this.size} bytes, and got more`);
    }
    if (this._held >= 0) {
      ends.push(this._held);
      this._held = -1;
    }
    const { minSize, avgSize, maxSize, _gearHi: ghi, _gearLo: glo } = this;
    const msh = this._maskSHi, msl = this._maskSLo, mlh = this._maskLHi, mll = this._maskLLo;
    // Absolute offset of bytes[0]: where this slice sits in the stream.
    const base = this._chunkStart + this._i;
    let start = this._chunkStart - base; // chunk start relative to bytes (may be negative)
    let i = this._i;
    let hi = this._hi, lo = this._lo;
    let pos = 0;
    while (pos < n) {
      if (i < minSize) {
        const skip = Math.min(minSize - i, n - pos);
        i += skip;
        pos += skip;
        continue;
      }
      let cut = -1;
      // Before the average: the stricter mask, fewer small chunks.
      let stop = Math.min(n, pos + (avgSize - i));
      while (pos < stop) {
        const b = bytes[pos];
        const a = lo << 1, g = glo[b], sum = (a + g) | 0;
        hi = (((hi << 1) | (lo >>> 31)) + ghi[b] + (((a & g) | ((a | g) & ~sum)) >>> 31)) | 0;
        lo = sum;
        if (((hi & msh) | (lo & msl)) === 0) {
          cut = pos;
          break;
        }
        pos++;
      }
      if (cut < 0) {
        i = pos - start;
        if (i < avgSize) break; // slice used up
        stop = Math.min(n, pos + (maxSize - i));
        while (pos < stop) {
          const b = bytes[pos];
          const a = lo << 1, g = glo[b], sum = (a + g) | 0;
          hi = (((hi << 1) | (lo >>> 31)) + ghi[b] + (((a & g) | ((a | g) & ~sum)) >>> 31)) | 0;
          lo = sum;
          if (((hi & mlh) | (lo & mll)) === 0) {
            cut = pos;
            break;
          }
          pos++;
        }
      }
      if (cut < 0) {
        i = pos - start;
        if (i < maxSize) break; // slice used up
        cut = pos; // a chunk of exactly maxSize bytes
      }
      const end = base + cut;
      // The byte at `cut` belongs to the next chunk.
      if (cut === n - 1 && ((cut - start) & 1) === 0 && cut - start !== maxSize) {
        if (this.size < 0) {
          this._held = end;
        } else if (end === this.size - 1) {
          break; // no cut: the current chunk runs to the end of input
        } else {
          ends.push(end);
        }
      } else {
        ends.push(end);
      }
      start = cut;
      pos = cut;
      i = 0;
      hi = 0;
      lo = 0;
    }
    this._chunkStart = base + start;
    this._i = n - start;
    this._hi = hi;
    this._lo = lo;
    if (base + n === this.size) ends.push(...this.finish());
    return ends;
  }

  /** Ends the input; returns the remaining chunk ends (the last one is the total length). */
  finish() {
    if (this._done) return [];
    this._done = true;
    this._held = -1; // its chunk absorbs the single byte after it
    const total = this._chunkStart + this._i;
    return this._i > 0 ? [total] : [];
  }
}

/** Chunk end offsets of a whole buffer (a convenience over FastCdc for tests and tools). */
export function cutPoints(data, options) {
  const cdc = new FastCdc(options);
  return [...cdc.update(data), ...cdc.finish()];
}
