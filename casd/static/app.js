// The upload page: one row per picked or dropped file, uploaded one after another through
// casd.js. The page keeps no state of its own: picking a file again after a reload resumes
// it because the server's handshake knows what it already has.
//
// Query parameters preset the settings:
// ?algo=sha256&chunking=fastcdc&chunk_size=1048576&concurrency=4

import {
  upload, CasdError, MiB, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNKING, DEFAULT_CONCURRENCY,
  DEFAULT_FASTCDC_AVG,
} from "./casd.js";
import { MIN_AVG, MAX_AVG } from "./fastcdc.js";
import { failureHint } from "./hints.js";

const $ = (sel, root = document) => root.querySelector(sel);
const server = new URL(".", location.href).href.replace(/\/$/, "");

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
function formatBytes(n) {
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n >= 100 ? 0 : 1)} ${UNITS[i]}`;
}

function formatRate(bytes, ms) {
  return ms > 0 ? `${(bytes / 1e6 / (ms / 1000)).toFixed(1)} MB/s` : "";
}

const defaultSize = (chunking) => (chunking === "fastcdc" ? DEFAULT_FASTCDC_AVG : DEFAULT_CHUNK_SIZE);

// A FastCDC average is a power of two from 1 KiB to 4 MiB: the nearest one to what was typed.
function fastcdcAverage(bytes) {
  const avg = 2 ** Math.round(Math.log2(bytes));
  return Math.min(MAX_AVG, Math.max(MIN_AVG, avg));
}

function presetSettings() {
  const q = new URLSearchParams(location.search);
  if (q.get("algo") === "md5" || q.get("algo") === "sha256") $("#algo").value = q.get("algo");
  const chunking = q.get("chunking") === "fixed" || q.get("chunking") === "fastcdc"
    ? q.get("chunking") : DEFAULT_CHUNKING;
  $("#chunking").value = chunking;
  $("#chunk-size").value = String(defaultSize(chunking) / MiB);
  // Switching the kind resets the size to that kind's default.
  $("#chunking").addEventListener("change", () => {
    $("#chunk-size").value = String(defaultSize($("#chunking").value) / MiB);
  });
  const chunk = Number(q.get("chunk_size"));
  if (Number.isSafeInteger(chunk) && chunk > 0) $("#chunk-size").value = String(chunk / MiB);
  const conc = Number(q.get("concurrency"));
  if (Number.isInteger(conc) && conc > 0) $("#concurrency").value = String(conc);
}

function currentSettings() {
  const chunkMiB = Number($("#chunk-size").value);
  const conc = Number($("#concurrency").value);
  const chunking = $("#chunking").value;
  let chunkSize = chunkMiB > 0 ? Math.max(1, Math.round(chunkMiB * MiB)) : defaultSize(chunking);
  if (chunking === "fastcdc") chunkSize = fastcdcAverage(chunkSize);
  return {
    algo: $("#algo").value,
    chunking,
    chunkSize,
    concurrency: Number.isInteger(conc) && conc > 0 ? conc : DEFAULT_CONCURRENCY,
    token: $("#token").value || undefined,
  };
}

const totals = { files: 0, done: 0, sent: 0, skipped: 0 };
function renderTotals() {
  const el = $("#totals");
  el.hidden = false;
  el.textContent = `${totals.done} of ${totals.files} files done · ${formatBytes(totals.sent)} sent · `
    + `${formatBytes(totals.skipped)} skipped thanks to dedup`;
}

class Row {
  constructor(file) {
    this.file = file;
    this.controller = new AbortController();
    this.el = $("#row").content.firstElementChild.cloneNode(true);
    this.part = (id) => $(`[data-testid="${id}"]`, this.el);
    this.part("name").textContent = file.name || "(unnamed)";
    this.part("size").textContent = formatBytes(file.size);
    this.part("cancel").addEventListener("click", () => this.controller.abort());
    $("#uploads").append(this.el);
    this.started = 0;
    this.phaseStart = 0;
    this.lastPhase = null;
  }

  setState(state, label = state) {
    this.el.dataset.state = state;
    this.part("status").textContent = label;
  }

  setFill(name, fraction) {
    $(`.fill.${name}`, this.el).style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  }

  setBar(fraction) {
    const bar = $(".bar", this.el);
    bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  }

  setBytes(id, n) {
    const el = this.part(id);
    el.dataset.bytes = String(n);
    el.textContent = formatBytes(n);
  }

  progress(p) {
    const now = performance.now();
    if (p.phase !== this.lastPhase) {
      this.lastPhase = p.phase;
      this.phaseStart = now;
    }
    const size = p.size || 1;
    if (p.phase === "hashing") {
      const f = p.size ? p.bytes_hashed / p.size : 1;
      this.setState("hashing");
      this.setFill("hash", f);
      this.setBar(f);
      this.part("detail").textContent = `hashing ${Math.floor(f * 100)}% · ${formatRate(p.bytes_hashed, now - this.phaseStart)}`;
      return;
    }
    this.setFill("hash", 0);
    const moved = p.bytes_sent + p.bytes_in_flight;
    const f = p.size ? (p.bytes_skipped + moved) / p.size : 1;
    this.setFill("skipped", p.bytes_skipped / size);
    this.setFill("sent", moved / size);
    this.setBar(f);
    this.part("chunks-total").textContent = String(p.chunks_total);
    this.part("chunks-sent").textContent = String(p.chunks_sent);
    this.part("chunks-skipped").textContent = String(p.chunks_skipped);
    this.setBytes("bytes-sent", p.bytes_sent);
    this.setBytes("bytes-skipped", p.bytes_skipped);
    if (p.phase === "handshake") {
      this.setState("checking");
      this.part("detail").textContent = "asking the server what it lacks";
    } else if (p.phase === "uploading") {
      this.setState("uploading");
      const rate = formatRate(p.bytes_sent + p.bytes_in_flight, now - this.phaseStart);
      this.part("detail").textContent = `uploading ${Math.floor(f * 100)}%${rate ? " · " + rate : ""}`
        + (p.retries ? ` · ${p.retries} retried` : "");
    } else if (p.phase === "merging") {
      this.setState("merging");
      this.part("detail").textContent = "merging";
    }
  }

  finished(summary) {
    const seconds = ((performance.now() - this.started) / 1000).toFixed(1);
    this.setState(summary.instant ? "instant" : "done");
    this.setFill("hash", 0);
    this.setFill("skipped", summary.size ? summary.bytes_skipped / summary.size : 1);
    this.setFill("sent", summary.size ? summary.bytes_sent / summary.size : 0);
    this.setBar(1);
    this.part("chunks-total").textContent = String(summary.chunks_total);
    this.part("chunks-sent").textContent = String(summary.chunks_sent);
    this.part("chunks-skipped").textContent = String(summary.chunks_skipped);
    this.setBytes("bytes-sent", summary.bytes_sent);
    this.setBytes("bytes-skipped", summary.bytes_skipped);
    this.part("detail").textContent = summary.instant
      ? "the server already had this file"
      : `finished in ${seconds} s`;
    const link = this.part("link");
    link.href = summary.url;
    link.hidden = false;
    this.part("digest").textContent = `${summary.algo} ${summary.digest}`;
    this.part("cancel").hidden = true;
    this.el.dataset.summary = JSON.stringify(summary);
  }

  failed(err) {
    this.part("cancel").hidden = true;
    if (err?.name === "AbortError" || this.controller.signal.aborted) {
      this.setState("cancelled");
      this.part("detail").textContent = "cancelled: pick the file again to resume";
      return;
    }
    this.setState("failed");
    const box = this.part("error");
    box.hidden = false;
    box.textContent = err instanceof CasdError ? `${err.code}: ${err.message}` : String(err?.message || err);
    this.part("detail").textContent = failureHint(err?.code);
  }

  async run(settings) {
    this.started = performance.now();
    try {
      const summary = await upload(this.file, {
        ...settings,
        server,
        signal: this.controller.signal,
        onProgress: (p) => this.progress(p),
      });
      this.finished(summary);
      totals.sent += summary.bytes_sent;
      totals.skipped += summary.bytes_skipped;
    } catch (err) {
      this.failed(err);
    }
    totals.done += 1;
    renderTotals();
  }
}

// Files upload one after another: hashing is CPU-bound, and one upload already keeps
// `concurrency` requests in flight.
let queue = Promise.resolve();
function enqueue(files) {
  for (const file of files) {
    const row = new Row(file);
    const settings = currentSettings();
    totals.files += 1;
    renderTotals();
    queue = queue.then(() => row.run(settings));
  }
}

presetSettings();
$("form.fields").addEventListener("submit", (e) => e.preventDefault());
const input = $("#file-input");
input.addEventListener("change", () => {
  enqueue([...input.files]);
  input.value = ""; // picking the same file again must fire "change" again
});

const drop = $("#drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  enqueue([...e.dataTransfer.files]);
});
// A file dropped beside the box would make the browser open it, leaving the page and
// stopping every upload: take it as an upload too.
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  if (!drop.contains(e.target)) enqueue([...e.dataTransfer.files]);
});
document.body.dataset.ready = "true";
