// Kiln's web UI: pick a platform, a Caddy version and plugins; build; watch it live.
// Plain DOM code, no framework. Views: "/" (the form) and "/builds/<key>" (one build).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_PATTERN = /^\/builds\/([0-9a-f]{64})$/;
const STEP_NAMES = {
  resolve: "Resolve versions",
  fetch: "Fetch modules",
  compile: "Compile",
  inspect: "Inspect",
  upload: "Store",
};
const CORE_STEPS = ["resolve", "fetch", "compile", "upload"];
const MAX_RESULTS = 12;
const MODULE_LIKE = /^(https?:\/\/)?[^\s\/@]+\.[^\s\/@]+\/\S+$/;
const MAX_LOG_LINES = 20000;

let catalog = [];
let activeOption = -1;

// --- HTTP -----------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem("kiln-api-key");
  return key ? { Authorization: "Bearer " + key } : {};
}

async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json", ...authHeaders() } });
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    const message = body && body.error ? body.error.message : resp.status + " " + resp.statusText;
    const err = new Error(message);
    err.status = resp.status;
    err.field = body && body.error ? body.error.field : undefined;
    throw err;
  }
  return body;
}

// The catalog and version endpoints answer in caddyserver.com's {"result": ...} envelope.
function unwrap(body) {
  return body && typeof body === "object" && "result" in body ? body.result : body;
}

// --- small helpers --------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatBytes(n) {
  if (!n && n !== 0) return "";
  const units = ["bytes", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function ago(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function platformText(b) {
  return b.os + "/" + b.arch + (b.arm ? "/v" + b.arm : "");
}

function showError(message) {
  const box = $("form-error");
  box.textContent = message;
  box.hidden = !message;
}

// --- the form: platform, Caddy version --------------------------------------------------

async function loadPlatforms() {
  const select = $("platform");
  let platforms = [{ os: "linux", arch: "amd64", arm: [] }];
  let defaultArm = "7";
  try {
    const body = await getJSON("/api/platforms");
    platforms = body.platforms;
    defaultArm = body.default_arm || defaultArm;
  } catch (e) { /* the built-in default still builds */ }
  select.replaceChildren(...platforms.map((p) => el("option", {
    value: p.os + "/" + p.arch, text: p.os + " / " + p.arch, "data-arm": p.arm.join(","),
  })));
  select.value = "linux/amd64";
  const arm = $("arm");
  const update = () => {
    const arms = (select.selectedOptions[0]?.dataset.arm || "").split(",").filter(Boolean);
    $("arm-field").hidden = arms.length === 0;
    arm.replaceChildren(...arms.map((v) => el("option", { value: v, text: "v" + v })));
    if (arms.includes(defaultArm)) arm.value = defaultArm;
  };
  select.addEventListener("change", update);
  update();
}

async function loadCaddyVersions() {
  try {
    const result = unwrap(await getJSON("/api/versions"));
    const versions = Array.isArray(result) ? result : result.versions || [];
    $("caddy-versions").replaceChildren(...versions.slice(0, 40).map((v) => el("option", { value: v })));
    if (result.latest) {
      $("caddy-hint").textContent = "Empty means the latest: " + result.latest + " now.";
    }
  } catch (e) { /* free text still works */ }
}

// --- the form: plugins ----------------------------------------------------------------

async function loadCatalog() {
  const status = $("catalog-status");
  try {
    const result = unwrap(await getJSON("/api/packages"));
    catalog = (Array.isArray(result) ? result : []).filter((p) => p.listed !== false);
    catalog.sort((a, b) => (b.downloads || 0) - (a.downloads || 0));
    status.textContent = catalog.length
      ? catalog.length + " plugins in the catalog. Type to search, or type any module path."
      : "This server has no plugin catalog: type a Go module path, e.g. github.com/owner/plugin.";
  } catch (e) {
    status.textContent = "The plugin catalog is not available: type a Go module path.";
  }
}

function searchCatalog(text) {
  const q = text.trim().toLowerCase().replace(/^https?:\/\//, "").split("@")[0];
  if (!q) return [];
  const hits = [];
  for (const p of catalog) {
    const names = (p.modules || []).map((m) => m.name).join(" ");
    const haystack = (p.path + " " + names).toLowerCase();
    if (haystack.includes(q)) hits.push({ path: p.path, detail: names });
    if (hits.length >= MAX_RESULTS) break;
  }
  return hits;
}

function renderResults() {
  const input = $("plugin-search");
  const list = $("plugin-results");
  const hits = searchCatalog(input.value);
  activeOption = -1;
  input.removeAttribute("aria-activedescendant");
  list.replaceChildren(...hits.map((hit, i) => {
    const option = el("li", { id: "plugin-option-" + i, role: "option", "aria-selected": "false",
                              "data-path": hit.path },
      el("span", { class: "path", text: hit.path }),
      hit.detail ? el("span", { class: "detail", text: hit.detail }) : "");
    option.addEventListener("mousedown", (ev) => { ev.preventDefault(); addPlugin(hit.path); });
    return option;
  }));
  list.hidden = hits.length === 0;
  input.setAttribute("aria-expanded", String(hits.length > 0));
}

function moveActive(delta) {
  const options = [...$("plugin-results").children];
  if (!options.length) return;
  activeOption = (activeOption + delta + options.length) % options.length;
  options.forEach((o, i) => o.setAttribute("aria-selected", String(i === activeOption)));
  $("plugin-search").setAttribute("aria-activedescendant", options[activeOption].id);
  options[activeOption].scrollIntoView({ block: "nearest" });
}

function closeResults() {
  $("plugin-results").hidden = true;
  $("plugin-search").setAttribute("aria-expanded", "false");
  $("plugin-search").removeAttribute("aria-activedescendant");
  activeOption = -1;
}

function selectedPaths() {
  return [...$("selected-plugins").children].map((li) => li.dataset.path);
}

function addPlugin(text) {
  let [path, version] = text.trim().replace(/^https?:\/\//, "").split("@");
  path = (path || "").replace(/\/+$/, "");
  const input = $("plugin-search");
  if (!path) return;
  if (selectedPaths().includes(path)) {
    showError(path + " is already chosen.");
    return;
  }
  showError("");
  const n = $("selected-plugins").children.length;
  const versionId = "plugin-version-" + n + "-" + Date.now();
  const listId = versionId + "-list";
  const versionInput = el("input", { id: versionId, class: "version", placeholder: "latest",
                                     list: listId, autocomplete: "off", spellcheck: "false",
                                     value: version || "" });
  const remove = el("button", { type: "button", class: "remove", "aria-label": "Remove " + path,
                                text: "Remove" });
  const li = el("li", { "data-path": path },
    el("span", { class: "path", text: path }),
    el("label", { for: versionId, class: "visually-hidden", text: "Version of " + path }),
    versionInput, el("datalist", { id: listId }), remove);
  remove.addEventListener("click", () => {
    li.remove();
    updateNoPlugins();
    input.focus();
  });
  $("selected-plugins").append(li);
  updateNoPlugins();
  input.value = "";
  closeResults();
  input.focus();
  loadPluginVersions(path, listId);
}

async function loadPluginVersions(path, listId) {
  try {
    const body = await getJSON("/api/plugin-versions?path=" + encodeURIComponent(path));
    const list = $(listId);
    if (list) list.replaceChildren(...body.versions.map((v) => el("option", { value: v })));
  } catch (e) { /* an unknown path is reported when the build is asked for */ }
}

function updateNoPlugins() {
  $("no-plugins").hidden = $("selected-plugins").children.length > 0;
}

function setupPluginPicker() {
  const input = $("plugin-search");
  input.addEventListener("input", renderResults);
  input.addEventListener("blur", () => setTimeout(closeResults, 150));
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowDown") { ev.preventDefault(); if ($("plugin-results").hidden) renderResults(); moveActive(1); }
    else if (ev.key === "ArrowUp") { ev.preventDefault(); moveActive(-1); }
    else if (ev.key === "Escape") { closeResults(); }
    else if (ev.key === "Enter") {
      ev.preventDefault();
      const options = [...$("plugin-results").children];
      if (activeOption >= 0 && options[activeOption]) addPlugin(options[activeOption].dataset.path);
      else addPlugin(input.value);
    }
  });
  $("plugin-add").addEventListener("click", () => addPlugin(input.value));
}

// --- the form: submit -----------------------------------------------------------------

async function submitBuild(ev) {
  ev.preventDefault();
  showError("");
  const pending = $("plugin-search").value.trim();
  if (pending) {
    // a module path typed but not added yet is meant; a search word is not
    if (!MODULE_LIKE.test(pending)) {
      showError("Pick a plugin for \u201c" + pending + "\u201d from the list, or clear the search field.");
      $("plugin-search").focus();
      return;
    }
    addPlugin(pending);
  }
  const [os, arch] = $("platform").value.split("/");
  const body = { os, arch, plugins: [] };
  if (!$("arm-field").hidden) body.arm = $("arm").value;
  const caddy = $("caddy-version").value.trim();
  if (caddy) body.caddy_version = caddy;
  for (const li of $("selected-plugins").children) {
    const version = li.querySelector("input.version").value.trim();
    body.plugins.push(version ? li.dataset.path + "@" + version : li.dataset.path);
  }
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem("kiln-api-key", key);
  const button = $("build-button");
  button.disabled = true;
  button.textContent = "Resolving versions…";
  try {
    const resp = await fetch("/api/builds", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    const doc = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      if (resp.status === 401 || resp.status === 403) $("key-field").hidden = false;
      throw new Error(doc.error ? doc.error.message : "the server answered " + resp.status);
    }
    location.assign("/builds/" + doc.key);
  } catch (e) {
    showError(e.message === "Failed to fetch" ? "Kiln cannot be reached; try again." : e.message);
    button.disabled = false;
    button.textContent = "Build";
  }
}

// --- one build, live --------------------------------------------------------------------

function renderSteps(current, finalState) {
  const list = $("steps");
  for (const name of CORE_STEPS) ensureStep(name);
  if (current) ensureStep(current);
  const items = [...list.children];
  const at = items.findIndex((li) => li.dataset.step === current);
  items.forEach((li, i) => {
    let status = "pending";
    if (finalState === "succeeded") status = "done";
    else if (at >= 0 && i < at) status = "done";
    else if (i === at) status = finalState === "failed" ? "failed" : finalState ? "stopped" : "current";
    li.className = "step " + status;
    li.querySelector(".status").textContent = {
      done: "done", current: "in progress", failed: "failed", stopped: "stopped", pending: "",
    }[status];
    if (status === "current") li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
  });
}

function ensureStep(name) {
  const list = $("steps");
  if (list.querySelector('[data-step="' + name + '"]')) return;
  const li = el("li", { "data-step": name, class: "step pending" },
    el("span", { class: "name", text: STEP_NAMES[name] || name }), " ",
    el("span", { class: "status" }));
  // a step Kiln adds (e.g. inspect) goes before "upload"
  const upload = list.querySelector('[data-step="upload"]');
  if (upload && name !== "upload") list.insertBefore(li, upload);
  else list.append(li);
}

function setState(text, kind) {
  const state = $("state");
  state.textContent = text;
  state.className = "state " + (kind || "");
}

function describeState(data) {
  switch (data.state) {
    case "queued":
      if (data.attempt) return "Waiting to retry (attempt " + (data.attempt + 1) + " of " + data.max_attempts + ")";
      return data.queue_position ? "Queued: " + data.queue_position + " build" + (data.queue_position === 1 ? "" : "s") + " ahead" : "Queued: next in line";
    case "running":
      return "Building" + (data.attempt > 1 ? " (attempt " + data.attempt + " of " + data.max_attempts + ")" : "") + "…";
    case "succeeded": return "Built";
    case "failed": return "Failed";
    case "cancelled": return "Cancelled";
    default: return data.state;
  }
}

function appendLog(data) {
  const log = $("log");
  const follow = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const line = el("span", { class: "line step-" + data.step, "data-seq": data.seq, text: data.line });
  log.append(line, "\n");
  while (log.childNodes.length > MAX_LOG_LINES * 2) { log.firstChild.remove(); log.firstChild.remove(); }
  if (follow) log.scrollTop = log.scrollHeight;
}

async function showResult(doc) {
  if (doc.state === "succeeded" && doc.artifact) {
    const link = $("download");
    link.href = doc.links.artifact;
    link.setAttribute("download", doc.artifact.filename);
    link.textContent = "Download " + doc.artifact.filename + " (" + formatBytes(doc.artifact.size) + ")";
    $("sha256").textContent = doc.artifact.sha256;
    $("result").hidden = false;
    if (doc.links.signature) showSignature(doc.links.signature);
  } else if (doc.state === "failed" || doc.state === "cancelled") {
    $("error").textContent = doc.error || "The build was " + doc.state + ".";
    $("failure").hidden = false;
  }
}

async function showSignature(url) {
  try {
    const resp = await fetch(url);
    if (!resp.ok) return;  // unsigned: the worker had no signing key
    const raw = new Uint8Array(await resp.arrayBuffer());
    if (raw.length !== 64) return;
    $("signature").textContent = btoa(String.fromCharCode(...raw));
    $("signature-link").href = url;
    $("signature-label").hidden = false;
    $("signature-value").hidden = false;
  } catch (e) { /* no signature to show */ }
}

async function showBuild(key) {
  $("build-view").hidden = false;
  $("share-url").value = location.origin + "/builds/" + key;
  $("copy-share").addEventListener("click", async () => {
    $("share-url").select();
    try { await navigator.clipboard.writeText($("share-url").value); $("copy-share").textContent = "Copied"; }
    catch (e) { document.execCommand("copy"); }
  });
  $("raw-log").href = "/api/builds/" + key + "/log";
  let doc;
  try {
    doc = await getJSON("/api/builds/" + key);
  } catch (e) {
    setState(e.status === 404 ? "No build has this key." : "Kiln cannot be reached: " + e.message, "failed");
    return;
  }
  document.title = "Caddy " + doc.caddy_version + " for " + platformText(doc) + " · Kiln";
  $("build-title").textContent = "Caddy " + doc.caddy_version + " for " + platformText(doc);
  $("build-summary").textContent = "Build " + key.slice(0, 12) + "… · " +
    (doc.plugins.length ? doc.plugins.length + " plugin" + (doc.plugins.length === 1 ? "" : "s") : "no plugins") +
    (doc.go_version ? " · " + doc.go_version : "");
  $("build-plugins").replaceChildren(...doc.plugins.map((p) =>
    el("li", {}, el("code", { text: p.package }), " " + p.version)));
  renderSteps("", "");
  watch(key);
}

// The stream is read with fetch, not EventSource: past the server's caps on held
// connections it answers 503 with Retry-After, which an EventSource cannot read (it just
// gives up). Refused again and again, the page polls the build's state instead.
const FINAL_STATES = ["succeeded", "failed", "cancelled"];
// stream attempts refused or lost in a row before the page polls instead
const STREAM_TRIES = 3;
const POLL_SECONDS = 5;
// seconds to wait when a 503 names no Retry-After
const BUSY_SECONDS = 10;
const EVENT_END = /\r\n\r\n|\n\n|\r\r/;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function parseEvent(block) {
  const ev = { event: "message", data: [], id: null, retry: null };
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;  // a comment: keep-alive, reconnect hint
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") ev.event = value;
    else if (field === "data") ev.data.push(value);
    else if (field === "id") ev.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) ev.retry = Number(value);
  }
  return { ...ev, data: ev.data.join("\n") };
}

// Read one stream to its end, handing each event to onEvent (false: stop reading).
// Returns how it ended: "done" (nothing more will come), "ended" (reconnect), or
// { status, retryAfter, message } when the server refused it.
async function readStream(url, lastEventId, onEvent) {
  const headers = { Accept: "text/event-stream", ...authHeaders() };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const resp = await fetch(url, { headers, cache: "no-store" });
  if (resp.status === 204) return "done";
  if (!resp.ok || !(resp.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    const body = await resp.json().catch(() => null);
    const retryAfter = parseInt(resp.headers.get("Retry-After") || "", 10);
    return {
      status: resp.status,
      retryAfter: retryAfter >= 0 ? retryAfter : BUSY_SECONDS,
      message: body && body.error ? body.error.message : resp.status + " " + resp.statusText,
    };
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return "ended";
    buffer += value;
    let end;
    while ((end = EVENT_END.exec(buffer))) {
      const block = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      if (onEvent(parseEvent(block)) === false) {
        reader.cancel().catch(() => {});
        return "done";
      }
    }
  }
}

async function countdown(seconds, text) {
  for (let left = seconds; left > 0; left--) {
    setState(text(left), "");
    await sleep(1000);
  }
}

async function watch(key) {
  const url = "/api/builds/" + key + "/events";
  const view = { step: "", finished: false };
  let lastEventId = "";
  let retryMs = 2000;
  let failures = 0;
  const onEvent = (ev) => {
    if (ev.id !== null) lastEventId = ev.id;
    if (ev.retry !== null) retryMs = ev.retry;
    failures = 0;  // the stream works: a later loss starts the count again
    if (!ev.data) return true;
    const data = JSON.parse(ev.data);
    if (ev.event === "state") {
      setState(describeState(data), data.state);
      if (data.state === "queued") renderSteps("", "");
    } else if (ev.event === "step") {
      view.step = data.step;
      renderSteps(view.step, "");
      $("log").append(el("span", { class: "marker", text: "▸ " + (STEP_NAMES[view.step] || view.step) }), "\n");
    } else if (ev.event === "log") {
      appendLog(data);
    } else if (ev.event === "result") {
      showFinal(data, view);
      return false;
    }
    return true;
  };
  for (;;) {
    let outcome;
    try {
      outcome = await readStream(url, lastEventId, onEvent);
    } catch (e) {
      outcome = "lost";
    }
    if (view.finished) return;
    if (outcome === "done") return pollBuild(key, view);  // ended without a result: ask
    if (outcome === "ended") {
      // the stream's lifetime is over (api.max_stream_seconds): resume where it was
      failures = 0;
      await sleep(retryMs);
      continue;
    }
    if (outcome.status && outcome.status < 500) {
      setState(outcome.status === 404 ? "No build has this key." : outcome.message, "failed");
      return;
    }
    failures++;
    if (failures >= STREAM_TRIES) return pollBuild(key, view);
    if (outcome === "lost") {
      setState("Connection lost; reconnecting…", "");
      await sleep(retryMs);
    } else {
      await countdown(outcome.retryAfter, (left) => "Server busy, retrying in " + left + " s");
    }
  }
}

// Without a live stream: read the build's state every few seconds until it is final.
async function pollBuild(key, view) {
  for (;;) {
    try {
      const doc = await getJSON("/api/builds/" + key);
      if (FINAL_STATES.includes(doc.state)) {
        await loadLogText(key, view);
        showFinal(doc, view);
        return;
      }
      setState(describeState(doc) + " (no live log: the server is busy; checking every " +
               POLL_SECONDS + " s)", doc.state);
    } catch (e) {
      if (e.status === 404) { setState("No build has this key.", "failed"); return; }
      setState("Kiln cannot be reached; trying again in " + POLL_SECONDS + " s", "");
    }
    await sleep(POLL_SECONDS * 1000);
  }
}

// The whole log as plain text (GET /api/builds/{key}/log), for a build not followed live.
async function loadLogText(key, view) {
  try {
    const resp = await fetch("/api/builds/" + key + "/log", { headers: authHeaders() });
    if (!resp.ok) return;
    const log = $("log");
    log.replaceChildren();
    for (const line of (await resp.text()).split("\n")) {
      const attempt = /^==> attempt (\d+)$/.exec(line);
      const step = /^==> (\S+)$/.exec(line);
      if (attempt) {
        log.append(el("span", { class: "marker", text: "▸ Attempt " + attempt[1] }), "\n");
      } else if (step) {
        view.step = step[1];
        log.append(el("span", { class: "marker", text: "▸ " + (STEP_NAMES[view.step] || view.step) }), "\n");
      } else if (line) {
        log.append(el("span", { class: "line", text: line }), "\n");
      }
    }
    log.scrollTop = log.scrollHeight;
  } catch (e) { /* the state and result still show */ }
}

function showFinal(doc, view) {
  view.finished = true;
  setState(describeState(doc), doc.state);
  renderSteps(view.step, doc.state);
  showResult(doc);
  loadRecent();
}

// --- recent builds ----------------------------------------------------------------------

async function loadRecent() {
  const list = $("recent-list");
  try {
    const body = await getJSON("/api/builds?limit=10");
    const builds = body.builds || [];
    if (!builds.length) {
      list.replaceChildren(el("li", { class: "hint", text: "No builds yet." }));
      return;
    }
    list.replaceChildren(...builds.map((b) => el("li", {},
      el("span", { class: "badge " + b.state, text: b.state }), " ",
      el("a", { href: "/builds/" + b.key,
                text: "Caddy " + b.caddy_version + " · " + platformText(b) }),
      el("span", { class: "detail", text: " " + (b.plugins.length ? b.plugins.join(", ") : "no plugins") +
                   " · " + ago(b.created_at) }))));
  } catch (e) {
    list.replaceChildren(el("li", { class: "hint", text: "The list of builds is not available." }));
  }
}

// --- start ----------------------------------------------------------------------------

function start() {
  const match = KEY_PATTERN.exec(location.pathname);
  if (match) {
    showBuild(match[1]);
  } else {
    $("new-build").hidden = false;
    if (sessionStorage.getItem("kiln-api-key")) $("key-field").hidden = false;
    loadPlatforms();
    loadCaddyVersions();
    loadCatalog();
    setupPluginPicker();
    updateNoPlugins();
    $("build-form").addEventListener("submit", submitBuild);
  }
  loadRecent();
}

start();
