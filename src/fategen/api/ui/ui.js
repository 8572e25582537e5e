// fategen's operator page. Plain JavaScript, no build step. Every API call carries the admin
// key (Authorization: Bearer), kept in this tab's sessionStorage. The event stream and the
// images are read with fetch(), because EventSource and <img src> cannot send that header.
"use strict";

const STORAGE = "fategen.key";
const $ = (id) => document.getElementById(id);

let key = null; // the admin key in use ("" while keys are off), null when logged out
let stream = null; // the AbortController of the event stream
let ticker = null; // the periodic refresh (figures and backends have no events)
const images = new Map(); // job id -> Promise of a blob: URL of its image

class Refused extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, method = "GET") {
  const r = await fetch(path, { method, headers: headers() });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Refused(r.status, body.error || `${r.status} ${r.statusText}`);
  }
  return r;
}

const json = async (path, method) => (await api(path, method)).json();
const jobs = async (status, limit) => (await json(`/jobs?status=${status}&limit=${limit}`)).jobs;
const refusal = (e) => e instanceof Refused && (e.status === 401 || e.status === 403);

// An element with attributes (on* are listeners) and children (strings become text, never HTML).
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) el.setAttribute(name, value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// -- logging in and out ------------------------------------------------------------------

async function login(candidate) {
  key = candidate;
  try {
    await json("/queue"); // an admin call: the key is taken or refused here
  } catch (e) {
    key = null;
    if (!refusal(e)) return showLogin(`The service did not answer: ${e.message}`);
    sessionStorage.removeItem(STORAGE);
    showLogin(candidate || e.status === 403 ? `Refused: ${e.message}` : null); // no key: just ask
    return;
  }
  if (candidate) sessionStorage.setItem(STORAGE, candidate);
  $("login").hidden = true;
  $("app").hidden = $("pause").hidden = $("live").hidden = false;
  $("logout").hidden = !candidate;
  stream = new AbortController();
  follow(stream.signal);
  refreshSoon();
  ticker = setInterval(refreshSoon, 5000);
}

function logout(message = null) {
  key = null;
  sessionStorage.removeItem(STORAGE);
  stream?.abort();
  clearInterval(ticker);
  for (const url of images.values()) url.then(URL.revokeObjectURL, () => {});
  images.clear();
  showLogin(message);
}

function showLogin(message) {
  $("app").hidden = $("pause").hidden = $("logout").hidden = $("live").hidden = true;
  $("login").hidden = false;
  $("refused").hidden = !message;
  $("refused").textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

function failed(e) {
  if (refusal(e)) logout(`Refused: ${e.message}`);
  else notice(e.message, true);
}

// An error stays until a refresh succeeds; news ("Retried as job ...") for 20 s, whatever
// refreshes meanwhile (a refresh right after it must not wipe it before it is read).
let noticeIsError = false;
function notice(text, error = false) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
  noticeIsError = Boolean(text) && error;
  if (text && !error) {
    setTimeout(() => { if ($("notice").textContent === text) notice(""); }, 20000);
  }
}

// -- the event stream: fetch() and a small Server-Sent Events parser -----------------------

async function* sse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop(); // the line not finished yet
    for (const line of lines) {
      if (line === "") {
        if (event.data !== undefined) yield event; // a blank line ends an event
        event = {};
      } else if (!line.startsWith(":")) { // ":" lines are heartbeats
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "data") event.data = event.data === undefined ? value : `${event.data}\n${value}`;
        else if (field === "event" || field === "id") event[field] = value;
      }
    }
  }
}

async function follow(signal) {
  let last = null;
  while (!signal.aborted) {
    try {
      const r = await fetch("/events", {
        signal,
        headers: { ...headers(), ...(last ? { "Last-Event-ID": last } : {}) },
      });
      if (!r.ok) {
        const body = await r.json().catch(() => ({}));
        throw new Refused(r.status, body.error || `${r.status} ${r.statusText}`);
      }
      live(true);
      for await (const event of sse(r.body)) {
        last = event.id ?? last;
        onEvent(event.event || "message", JSON.parse(event.data));
      }
    } catch (e) {
      if (signal.aborted) return;
      if (refusal(e)) return logout(`Refused: ${e.message}`);
    }
    live(false);
    await new Promise((resolve) => setTimeout(resolve, 2000));
    refreshSoon(); // what happened while the stream was down
  }
}

function live(on) {
  $("live").textContent = on ? "live" : "offline";
  $("live").classList.toggle("on", on);
}

function onEvent(type, job) {
  if (type === "progress") {
    const card = document.querySelector(`#running [data-job="${CSS.escape(job.job_id)}"]`);
    if (card) return card.replaceWith(runningCard(job));
  }
  if (type !== "preview") refreshSoon();
}

// -- reading the state and drawing it ----------------------------------------------------

let refreshing = null;
let again = false;

function refreshSoon() {
  if (refreshing) {
    again = true; // one more once this one ends, however many were asked for meanwhile
    return;
  }
  refreshing = refresh()
    .catch(failed)
    .finally(() => {
      refreshing = null;
      if (again && key !== null) {
        again = false;
        refreshSoon();
      }
    });
}

async function refresh() {
  const [queue, stats, fleet, queued, processing, completed, failures] = await Promise.all([
    json("/queue"),
    json("/stats"),
    json("/backends").catch((e) => (refusal(e) ? Promise.reject(e) : { backends: [] })),
    jobs("queued", 100),
    jobs("processing", 20),
    jobs("completed", 24),
    jobs("failed", 20),
  ]);
  if (key === null) return; // logged out meanwhile
  if (noticeIsError) notice("");
  drawQueueState(queue);
  drawFigures(stats);
  $("running").replaceChildren(...processing.map(runningCard));
  if (!processing.length) $("running").append(h("p", { class: "empty" }, "Nothing runs."));
  $("queue").replaceChildren(...queued.map(queuedItem));
  if (!queued.length) $("queue").append(h("li", { class: "empty" }, "The queue is empty."));
  $("queue-count").textContent = queue.queued > queued.length ? `(first ${queued.length} of ${queue.queued})` : "";
  const retried = new Set([...queued, ...processing, ...completed, ...failures].map((j) => j.retry_of));
  $("failed").replaceChildren(...failures.map((j) => failedItem(j, retried.has(j.job_id))));
  if (!failures.length) $("failed").append(h("p", { class: "empty" }, "No failures."));
  drawGallery(completed);
  drawBackends(fleet.backends);
}

function drawQueueState(queue) {
  $("paused").hidden = !queue.paused;
  $("pause").textContent = queue.paused ? "Resume" : "Pause";
  $("pause").dataset.paused = queue.paused;
}

function drawFigures(stats) {
  $("f-queued").textContent = stats.queued;
  $("f-processing").textContent = stats.processing;
  $("f-hour").textContent = stats.completed_last_hour;
  $("f-failed").textContent = stats.failed_last_hour;
  $("f-wait").textContent = stats.median_wait_seconds === null ? "–" : duration(stats.median_wait_seconds);
}

function runningCard(job) {
  const { step, of } = job.progress;
  return h("article", { class: "job", "data-job": job.job_id, "data-step": step },
    h("p", { class: "prompt" }, job.prompt),
    h("p", { class: "meta" }, `${job.nick} · ${job.model} · ${job.width}×${job.height}×${job.count}`,
      job.backend ? ` · on ${job.backend}` : ""),
    h("div", { class: "progress" },
      h("progress", { max: of || 1, value: step }),
      h("span", {}, of ? `${step}/${of}` : "starting")));
}

function queuedItem(job) {
  return h("li", { class: "job", "data-job": job.job_id },
    h("b", { class: "position", title: "queue position" }, job.queue_position),
    h("span", { class: "prompt" }, job.prompt),
    h("span", { class: "meta" }, `${job.nick} · ${job.model} · `, waiting(job.created)));
}

// "waiting 12 s", kept current by a one-second timer (see the end).
function waiting(created) {
  return h("span", { "data-since": created }, `waiting ${duration(Math.floor(since(created)))}`);
}

function failedItem(job, retried) {
  const button = h("button", { type: "button", disabled: retried, onclick: () => retry(job, button) },
    retried ? "Retried" : "Retry");
  return h("article", { class: "job", "data-job": job.job_id },
    h("p", { class: "prompt" }, job.prompt),
    h("p", { class: "error" }, job.error || "failed"),
    h("p", { class: "meta" }, `${job.nick} · ${job.model} · ${clock(job.finished)}`),
    button);
}

async function retry(job, button) {
  button.disabled = true;
  try {
    const fresh = await json(`/job/${job.job_id}/retry`, "POST");
    button.textContent = "Retried";
    notice(`Retried as job ${fresh.job_id}.`);
  } catch (e) {
    button.disabled = false;
    failed(e);
  }
  refreshSoon();
}

async function togglePause() {
  const paused = $("pause").dataset.paused === "true";
  try {
    drawQueueState(await json(paused ? "/queue/resume" : "/queue/pause", "POST"));
  } catch (e) {
    failed(e);
  }
  refreshSoon();
}

// -- the gallery: images through fetch() and blob: URLs, revoked when they leave it -------

function image(jobId) {
  if (!images.has(jobId)) {
    const url = api(`/job/${jobId}/image`).then(async (r) => URL.createObjectURL(await r.blob()));
    url.catch(() => images.delete(jobId)); // tried again on the next refresh
    images.set(jobId, url);
  }
  return images.get(jobId);
}

function drawGallery(completed) {
  const keep = new Set(completed.map((j) => j.job_id));
  for (const [id, url] of images) {
    if (!keep.has(id) && $("viewer").dataset.job !== id) {
      images.delete(id);
      url.then(URL.revokeObjectURL, () => {});
    }
  }
  $("gallery").replaceChildren(...completed.map(thumbnail));
  if (!completed.length) $("gallery").append(h("p", { class: "empty" }, "No results yet."));
}

function thumbnail(job) {
  const img = h("img", { alt: job.prompt, loading: "lazy" });
  image(job.job_id).then((url) => (img.src = url), () => {});
  return h("button", { type: "button", class: "thumb", "data-job": job.job_id, onclick: () => view(job) },
    img, h("span", {}, job.prompt));
}

async function view(job) {
  const dialog = $("viewer");
  dialog.dataset.job = job.job_id;
  $("viewer-img").alt = job.prompt;
  $("viewer-img").src = await image(job.job_id).catch(() => "");
  const facts = [
    ["prompt", job.prompt], ["negative", job.negative], ["seed", job.seed], ["model", job.model],
    ["size", `${job.width}×${job.height}, ${job.count} image${job.count > 1 ? "s" : ""}`],
    ["from", startedFrom(job)],
    ["nick", job.nick], ["backend", job.backend], ["submitted", clock(job.created)],
    ["started", `${clock(job.started)} (waited ${duration(seconds(job.started) - seconds(job.created))})`],
    ["finished", `${clock(job.finished)} (ran ${duration(seconds(job.finished) - seconds(job.started))})`],
    ["job", job.job_id],
  ];
  $("viewer-facts").replaceChildren(...facts.filter(([, v]) => v !== null && v !== "")
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
  dialog.showModal();
}

// "upscale of image 2 of job 3f0c2a9e", "an upload, strength 0.6"; null for a text job.
function startedFrom(job) {
  const input = job.input;
  if (!input) return null;
  const what = input.source === "job" ? `image ${input.image} of job ${input.job_id.slice(0, 8)}`
    : input.source === "upload" ? "an upload" : input.source;
  return job.kind === "upscale" ? `upscale of ${what}` : `${what}, strength ${input.strength}`;
}

function drawBackends(backends) {
  $("fleet").hidden = backends.length < 2;
  $("backends").replaceChildren(...backends.map((b) =>
    h("tr", { "data-backend": b.name, class: b.state },
      h("td", {}, b.name), h("td", {}, b.enabled ? b.state : `${b.state} (drained)`),
      h("td", {}, b.loaded_checkpoint || "–"), h("td", {}, b.running.length), h("td", {}, b.jobs_done))));
}

// -- times ---------------------------------------------------------------------------------

const seconds = (iso) => (iso ? Date.parse(iso) / 1000 : NaN);
const since = (iso) => Date.now() / 1000 - seconds(iso);
const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–");

function duration(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 10 && !Number.isInteger(s)) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// -- start ---------------------------------------------------------------------------------

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  login($("key").value.trim());
});
$("logout").addEventListener("click", () => logout());
$("pause").addEventListener("click", togglePause);
$("viewer").addEventListener("click", (e) => e.target === $("viewer") && $("viewer").close());
$("viewer").addEventListener("close", () => delete $("viewer").dataset.job);
setInterval(() => document.querySelectorAll("[data-since]").forEach((el) => el.replaceWith(waiting(el.dataset.since))), 1000);
login(sessionStorage.getItem(STORAGE) || ""); // no key stored: maybe keys are off
