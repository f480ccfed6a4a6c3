// The dashboard's page: polls /api/overview and draws it.
//
// Everything shown comes from Redis, where producers write: image ids, request
// ids, errors and messages are untrusted text. This script builds the DOM with
// createElement and textContent only (never innerHTML), sets no attribute that
// can run or load anything from data (the only URL built from data is a
// same-origin /thumb?name=, percent-encoded), and the page's CSP forbids
// inline script. The token the operator types stays in this page's memory and
// goes only into the X-Dashboard-Token header of our own POSTs.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const HISTORY_SECONDS = 15 * 60;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const state = { token: null, writable: false, data: null, openMessages: new Set(), armed: null,
    thumbs: new Map() };  // thumbnail name -> { image, loaded, attempts, failed }
  // The dashboard makes a few thumbnails a second and answers 503 beyond that:
  // a thumbnail shows a placeholder until its image has loaded, and is asked
  // for again after a pause, never shown as a broken image.
  const THUMB_RETRY_MS = 1000;
  const THUMB_RETRY_MAX_MS = 8000;
  const THUMB_ATTEMPTS = 8;

  const $ = (id) => document.getElementById(id);

  // An element with text children (strings become text nodes) and plain attributes.
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    return node;
  }

  function text(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined || typeof seconds !== "number") return "–";
    if (seconds < 90) return `${seconds.toFixed(1)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    return `${(seconds / 3600).toFixed(1)} h ago`;
  }

  function number(value) {
    return typeof value === "number" ? value.toLocaleString("en") : "–";
  }

  // -- fetching -------------------------------------------------------------------

  async function refresh() {
    let data;
    try {
      const response = await fetch("/api/overview", { cache: "no-store" });
      data = await response.json();
      if (!response.ok) throw new Error(data.error || response.statusText);
    } catch (error) {
      setStatus("error", `cannot reach the dashboard: ${error.message}`);
      return;
    }
    state.data = data;
    state.writable = Boolean(data.writable);
    if (data.error) {
      const when = data.read_at ? new Date(data.read_at * 1000).toLocaleTimeString() : "never";
      setStatus("stale", `${data.error}; figures from ${when}`);
    } else {
      setStatus("ok", `updated ${new Date(data.now * 1000).toLocaleTimeString()}`);
    }
    render(data);
  }

  function setStatus(kind, message) {
    const status = $("status");
    status.dataset.state = kind;
    status.textContent = message;
  }

  async function post(path, body) {
    const headers = { "Content-Type": "application/json" };
    if (state.token !== null) headers["X-Dashboard-Token"] = state.token;
    let response, answer;
    try {
      response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}), cache: "no-store" });
      answer = await response.json();
    } catch (error) {
      return { ok: false, message: `the request failed: ${error.message}` };
    }
    if (!response.ok) return { ok: false, message: answer.error || response.statusText, status: response.status };
    return answer;
  }

  function showAction(result) {
    const message = $("action-message");
    message.dataset.ok = String(Boolean(result.ok));
    message.textContent = result.message + (result.remaining ? ` (${result.remaining} remain)` : "");
  }

  // -- drawing ----------------------------------------------------------------------

  function render(data) {
    $("queue-name").textContent = `queue ${text(data.queue)}`;
    const totals = data.totals || {};
    const minute = data.last_minute || {};
    $("fig-waiting").textContent = number(totals.waiting);
    $("fig-in-flight").textContent = number(totals.in_flight);
    $("fig-delayed").textContent = number(totals.delayed);
    $("fig-dead").textContent = number(totals.dead);
    $("fig-completed").textContent = number(minute.completed);
    $("fig-failed").textContent = number(minute.failed);
    $("fig-retried").textContent = number(minute.retried);
    const hosts = Object.entries(data.host_queues || {});
    $("host-queues").textContent = hosts.length
      ? "host queues: " + hosts.map(([host, depth]) => `${host} ${depth} waiting`).join(", ")
      : "";
    if (data.history) renderCharts(data.history, data.now);
    renderSupervisors(data.supervisors || [], data.now);
    renderDeadLetters(data.dead_letters || [], totals.dead);
    renderRecords(data.records || { items: [] });
    renderRequests(data.requests || { open: 0, items: [] });
    renderButtons();
  }

  function renderCharts(history, now) {
    const samples = history.samples || [];
    const queueSeries = ["waiting", "in flight", "delayed", "dead"].map((name, index) => ({
      name, points: samples.map((sample) => [sample[0], sample[index + 1]]),
    }));
    drawChart($("chart-queue"), $("legend-queue"), queueSeries, now);
    drawBars($("chart-throughput"), $("legend-throughput"), history.throughput || [], history.bucket_seconds || 10, now);
  }

  function niceCeiling(value) {
    if (value <= 5) return 5;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  // Axes of a chart of the last HISTORY_SECONDS: gridlines with their values, minutes below.
  function frame(highest, now) {
    const width = 600, height = 170, left = 44, right = 8, top = 8, bottom = 20;
    const ceiling = niceCeiling(highest);
    const scale = {
      x: (t) => left + (width - left - right) * (1 - (now - t) / HISTORY_SECONDS),
      y: (v) => top + (height - top - bottom) * (1 - v / ceiling),
      pixelsPerSecond: (width - left - right) / HISTORY_SECONDS,
      nodes: [],
    };
    for (const fraction of [0, 0.5, 1]) {
      const value = ceiling * fraction;
      scale.nodes.push(svg("line", { x1: left, x2: width - right, y1: scale.y(value), y2: scale.y(value), class: "grid" }));
      const label = svg("text", { x: left - 4, y: scale.y(value) + 3, "text-anchor": "end" });
      label.textContent = number(value);
      scale.nodes.push(label);
    }
    for (const minutes of [15, 10, 5, 0]) {
      const label = svg("text", { x: scale.x(now - minutes * 60), y: height - 4, "text-anchor": minutes ? "middle" : "end" });
      label.textContent = minutes ? `−${minutes} min` : "now";
      scale.nodes.push(label);
    }
    return scale;
  }

  // One stacked bar per stats bucket: completed, failed, retried.
  function drawBars(target, legend, rows, bucket, now) {
    const names = ["completed", "failed", "retried"];
    const colours = [4, 3, 2];
    const recent = rows.filter((row) => now - row[0] <= HISTORY_SECONDS);
    const scale = frame(Math.max(0, ...recent.map((row) => row[1] + row[2] + row[3])), now);
    const width = Math.max(1, bucket * scale.pixelsPerSecond - 1);
    for (const row of recent) {
      let base = 0;
      names.forEach((name, index) => {
        const value = row[index + 1];
        if (!value) return;
        const top = scale.y(base + value);
        scale.nodes.push(svg("rect", {
          x: scale.x(row[0]).toFixed(1), y: top.toFixed(1), width: width.toFixed(1),
          height: Math.max(0.5, scale.y(base) - top).toFixed(1), class: `bar b${colours[index]}`, "data-series": name,
        }));
        base += value;
      });
    }
    legend.replaceChildren(...names.map((name, index) => {
      const total = recent.reduce((sum, row) => sum + row[index + 1], 0);
      return el("span", { "data-series": name }, el("span", { class: `swatch c${colours[index]}` }), `${name} ${number(total)} in 15 min`);
    }));
    target.replaceChildren(...scale.nodes);
  }

  function drawChart(target, legend, series, now) {
    const span = HISTORY_SECONDS;
    let highest = 0;
    for (const line of series) for (const point of line.points) highest = Math.max(highest, point[1]);
    const scale = frame(highest, now);
    const { x, y, nodes } = scale;
    legend.replaceChildren();
    series.forEach((line, index) => {
      const colour = line.colour !== undefined ? line.colour : index;
      const points = line.points.filter((p) => now - p[0] <= span).map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
      if (points.length === 1) points.push(points[0]);
      if (points.length) nodes.push(svg("polyline", { points: points.join(" "), class: `line l${colour}` }));
      const last = line.points.length ? line.points[line.points.length - 1][1] : null;
      legend.append(el("span", { "data-series": line.name }, el("span", { class: `swatch c${colour}` }), `${line.name} ${number(last)}`));
    });
    target.replaceChildren(...nodes);
  }

  function renderSupervisors(supervisors, now) {
    const box = $("supervisors");
    if (!supervisors.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No supervisor is running on this queue."));
      return;
    }
    box.replaceChildren(...supervisors.map((supervisor) => {
      const workers = supervisor.workers || [];
      const heading = el("h3", {},
        `${text(supervisor.host)} `,
        el("span", { class: "muted" },
          `host id ${text(supervisor.host_id)} · instance ${text(supervisor.instance)} · pid ${text(supervisor.pid)} · ` +
          `${workers.length}/${text(supervisor.desired_workers)} workers · ` +
          `${supervisor.stopping ? "stopping" : supervisor.ready ? "ready" : "starting"} · ` +
          `lease renewed ${age(supervisor.beat_age)}`));
      const rows = [];
      if (supervisor.ledger) rows.push(childRow("ledger", supervisor.ledger, now));
      for (const worker of workers) rows.push(childRow(`worker ${text(worker.slot)}`, worker, now));
      const table = el("table", { class: "children" },
        el("thead", {}, el("tr", {}, ...["", "pid", "last beat", "in flight", "doing"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows));
      return el("div", { class: "supervisor", "data-instance": text(supervisor.instance) }, heading, shmLine(supervisor.shm), table);
    }));
  }

  // The frames waiting in the supervisor's /dev/shm against SHM_BUDGET_BYTES.
  function shmLine(shm) {
    if (!shm) return null;
    const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;
    const share = shm.budget_bytes > 0 ? Math.floor(100 * shm.waiting_bytes / shm.budget_bytes) : null;
    const words = share === null
      ? `shared memory: ${mb(shm.waiting_bytes)} of frames waiting (no SHM_BUDGET_BYTES)`
      : `shared memory: ${mb(shm.waiting_bytes)} of frames waiting, ${share}% of SHM_BUDGET_BYTES (${mb(shm.budget_bytes)})`;
    return el("p", { class: share !== null && share >= 90 ? "shm warn" : "shm" }, words);
  }

  // What the lease state says a child does beyond its beat: the task in hand,
  // its phase and since when, in whatever shape the supervisor sends it.
  function describeMore(more, now) {
    const parts = [];
    for (const [key, value] of Object.entries(more || {})) {
      if (value === null || value === undefined) continue;
      if (typeof value === "object" && !Array.isArray(value)) {
        const inner = Object.entries(value).filter(([, v]) => v !== null && v !== undefined)
          .map(([k, v]) => describeValue(k, v, now));
        parts.push(`${key}: ${inner.join(", ")}`);
      } else {
        parts.push(describeValue(key, value, now));
      }
    }
    return parts.join("; ");
  }

  function describeValue(key, value, now) {
    // Epoch seconds (…_at, since) read better as an age.
    if (typeof value === "number" && (key.endsWith("_at") || key === "since") && value > 1e9) {
      return `${key.replace(/_at$/, "")} ${age(now - value)}`;
    }
    return `${key} ${typeof value === "object" ? JSON.stringify(value) : value}`;
  }

  function childRow(label, child, now) {
    return el("tr", {},
      el("td", {}, label),
      el("td", { class: "num" }, text(child.pid)),
      el("td", {}, age(child.heartbeat_age)),
      el("td", { class: "num" }, text(child.in_flight)),
      el("td", { class: "ident doing" }, describeChild(child, now)));
  }

  // The task a worker has in hand, as the lease state has it (null: idle),
  // then anything else the state says of the child.
  function describeChild(child, now) {
    const more = Object.assign({}, child.more || {});
    const parts = [];
    if ("task" in more) {
      const task = more.task;
      delete more.task;
      parts.push(task && typeof task === "object" ? describeTask(task, now) : "idle");
    }
    const rest = describeMore(more, now);
    if (rest) parts.push(rest);
    return parts.join("; ");
  }

  function describeTask(task, now) {
    const bits = [];
    if (task.phase !== undefined && task.phase !== null) bits.push(String(task.phase));
    if (typeof task.started_at === "number") bits.push(`for ${Math.max(0, now - task.started_at).toFixed(1)} s`);
    else if (typeof task.age === "number") bits.push(`for ${task.age.toFixed(1)} s`);
    if (task.request_id !== undefined && task.request_id !== null) bits.push(`request ${task.request_id}`);
    if (task.image_id !== undefined && task.image_id !== null) bits.push(`image ${task.image_id}`);
    if (task.task_id !== undefined && task.task_id !== null) {
      bits.push(`task ${task.task_id}` + (task.attempt ? `, attempt ${task.attempt}` : ""));
    }
    return bits.join(" · ");
  }

  function renderDeadLetters(letters, total) {
    $("dead-count").textContent = total ? `${number(total)} in all, newest ${letters.length} shown` : "none";
    const rows = letters.map((letter) => {
      const details = el("details", { "data-id": letter.id },
        el("summary", {}, letter.message === null || letter.message === undefined
          ? "no message"
          : `message (${number(letter.message_bytes)} bytes)`),
        el("pre", {}, letter.message === null || letter.message === undefined ? "" : letter.message));
      if (state.openMessages.has(letter.id)) details.open = true;
      details.addEventListener("toggle", () => {
        if (details.open) state.openMessages.add(letter.id); else state.openMessages.delete(letter.id);
      });
      const button = el("button", { type: "button", class: "requeue", "data-id": letter.id }, "Requeue");
      button.addEventListener("click", () => requeueOne(letter.id));
      return el("tr", { "data-id": letter.id },
        el("td", { title: text(letter.failed_at) }, age(letter.age)),
        el("td", { class: "ident request-id" }, text(letter.request_id)),
        el("td", { class: "ident image-id" }, text(letter.image_id)),
        el("td", { class: "num" }, text(letter.attempts)),
        el("td", { class: "error" }, text(letter.error)),
        el("td", {}, details),
        el("td", {}, button));
    });
    $("dead-rows").replaceChildren(...rows);
  }

  function renderRecords(records) {
    $("records-source").textContent = records.source
      ? `newest first, from ${records.source}`
      : "No results.json here and no results stream to read records from.";
    const shown = new Set((records.items || []).map((record) => record.thumb).filter(Boolean));
    for (const name of state.thumbs.keys()) if (!shown.has(name)) state.thumbs.delete(name);
    $("records").replaceChildren(...(records.items || []).map((record) => {
      const picture = record.thumb
        ? thumbnail(record.thumb, text(record.image_id))
        : el("div", { class: "noimage" }, record.status !== "completed" ? "no file"
          : record.file_here ? "thumbnails for the newest only" : "file not on this host");
      return el("div", { class: "record", "data-status": text(record.status) },
        picture,
        el("div", {}, el("span", { class: `badge ${record.status === "completed" ? "completed" : "failed"}` }, text(record.status)),
          " ", el("span", { class: "muted" }, text(record.timestamp))),
        el("div", { class: "ident image-id" }, `image ${text(record.image_id)}`),
        el("div", { class: "ident request-id muted" }, `request ${text(record.request_id)}`),
        record.error ? el("div", { class: "error" }, text(record.error)) : null,
        record.width ? el("div", { class: "muted" }, `${record.width}×${record.height}, ${number(record.bytes)} bytes`) : null);
    }));
  }

  // The thumbnail's image once it has loaded, else a placeholder it replaces when it does.
  function thumbnail(name, alt) {
    let thumb = state.thumbs.get(name);
    if (!thumb) {
      thumb = { image: null, loaded: false, attempts: 0, failed: false };
      state.thumbs.set(name, thumb);
      loadThumbnail(name, thumb, alt);
    }
    if (thumb.loaded) return thumb.image;
    const placeholder = el("div", { class: "noimage thumb-pending" }, thumb.failed ? "no thumbnail" : "thumbnail coming…");
    placeholder.dataset.thumb = name;
    return placeholder;
  }

  function loadThumbnail(name, thumb, alt) {
    const image = new Image();
    image.alt = alt;
    image.addEventListener("load", () => {
      thumb.image = image;
      thumb.loaded = true;
      for (const node of document.querySelectorAll("#records .thumb-pending")) {
        if (node.dataset.thumb === name) node.replaceWith(image);
      }
    });
    image.addEventListener("error", () => {
      thumb.attempts += 1;
      if (state.thumbs.get(name) !== thumb) return;  // no longer shown
      if (thumb.attempts >= THUMB_ATTEMPTS) {
        thumb.failed = true;
        for (const node of document.querySelectorAll("#records .thumb-pending")) {
          if (node.dataset.thumb === name) node.textContent = "no thumbnail";
        }
        return;
      }
      const delay = Math.min(THUMB_RETRY_MAX_MS, THUMB_RETRY_MS * 2 ** (thumb.attempts - 1));
      setTimeout(() => loadThumbnail(name, thumb, alt), delay);
    });
    image.src = `/thumb?name=${encodeURIComponent(name)}`;
  }

  function renderRequests(requests) {
    const items = requests.items || [];
    $("requests-count").textContent = requests.open
      ? `${number(requests.open)} open` + (requests.open > items.length ? `, the ${items.length} ending soonest shown` : "")
      : "none";
    $("requests-rows").replaceChildren(...items.map((request) => el("tr", {},
      el("td", { class: "ident request-id" }, text(request.request_id)),
      el("td", { class: "num progress" }, `${number(request.recorded)} of ${number(request.request_images)}`),
      el("td", { class: "num" }, number(request.completed)),
      el("td", { class: "num" }, number(request.failed)),
      el("td", {}, age(request.age)),
      el("td", {}, request.expires_in === null || request.expires_in === undefined ? "–" : `${Math.round(request.expires_in)} s`))));
  }

  function renderButtons() {
    const buttons = [$("requeue-all"), $("purge"), ...document.querySelectorAll("button.requeue")];
    for (const button of buttons) {
      button.disabled = !state.writable;
      button.title = state.writable ? "" : "read-only: DASHBOARD_TOKEN is not set where the dashboard runs";
    }
    $("token-form").hidden = !state.writable;
    if (!state.writable) {
      $("dead-note").textContent = "Read-only: set DASHBOARD_TOKEN where the dashboard runs to requeue or purge.";
    } else if (state.token === null) {
      $("dead-note").textContent = "Enter the token (top right) to requeue or purge.";
    } else {
      $("dead-note").textContent = "Changes enabled.";
    }
  }

  // -- actions ------------------------------------------------------------------------

  async function requeueOne(id) {
    showAction(await post("/api/dead/requeue", { id }));
    refreshSoon();
  }

  // A destructive button asks for a second click within a few seconds instead of a dialog.
  function armed(button, label, action) {
    button.addEventListener("click", async () => {
      if (state.armed !== button) {
        disarm();
        state.armed = button;
        button.dataset.label = button.textContent;
        button.textContent = label();
        button.classList.add("armed");
        state.disarmTimer = setTimeout(disarm, 5000);
        return;
      }
      disarm();
      showAction(await action());
      refreshSoon();
    });
  }

  function disarm() {
    const button = state.armed;
    if (!button) return;
    clearTimeout(state.disarmTimer);
    button.textContent = button.dataset.label;
    button.classList.remove("armed");
    state.armed = null;
  }

  function refreshSoon() {
    setTimeout(refresh, 300);
  }

  async function unlock(event) {
    event.preventDefault();
    const given = $("token").value;
    const previous = state.token;
    state.token = given;
    const result = await post("/api/unlock", {});
    if (result.ok) {
      $("token").value = "";
      $("token-state").textContent = "changes enabled";
      $("lock").hidden = false;
    } else {
      state.token = previous;
      $("token-state").textContent = result.message;
    }
    renderButtons();
  }

  function lock() {
    state.token = null;
    $("token-state").textContent = "";
    $("lock").hidden = true;
    renderButtons();
  }

  async function search(event) {
    event.preventDefault();
    const wanted = $("search-id").value.trim();
    const box = $("search-result");
    if (!wanted) return;
    box.replaceChildren(el("p", { class: "muted" }, "searching…"));
    let answer;
    try {
      const response = await fetch(`/api/task?id=${encodeURIComponent(wanted)}`, { cache: "no-store" });
      answer = await response.json();
      if (!response.ok) throw new Error(answer.error || response.statusText);
    } catch (error) {
      box.replaceChildren(el("p", { class: "error" }, `search failed: ${error.message}`));
      return;
    }
    const found = answer.found || [];
    const items = found.length
      ? found.map(describePlace)
      : [el("p", {}, `No task with request id ${answer.request_id} is queued, in flight, delayed, dead or recorded.`)];
    for (const what of answer.not_searched || []) items.push(el("p", { class: "muted" }, `not searched: ${what}`));
    box.replaceChildren(...items);
  }

  function describePlace(place) {
    const parts = [];
    switch (place.state) {
      case "queued":
        parts.push(`in ${place.list} at position ${place.position} of ${text(place.length)}`);
        break;
      case "in_flight": {
        const worker = place.worker || {};
        parts.push(place.supervisor_alive ? `on ${text(place.host)} (host id ${text(place.host_id)})` : "of a supervisor whose lease expired");
        parts.push(`instance ${text(place.instance)}, worker ${text(worker.slot)} pid ${text(worker.pid)}`);
        parts.push(`task ${text(place.task_id)}, delivery ${text(place.deliveries)}`);
        if (place.age !== undefined) parts.push(`started ${age(place.age)}`);
        if (place.current && place.current.phase) parts.push(`phase ${place.current.phase}`);
        parts.push(`list ${place.list}`);
        break;
      }
      case "delayed":
        parts.push(`task ${text(place.task_id)}, delivery ${text(place.deliveries)}, due ` +
          (place.due_in > 0 ? `in ${place.due_in} s` : "now") + ` (${new Date(place.due_at * 1000).toLocaleString()})`);
        break;
      case "dead":
        parts.push(`error: ${text(place.error)}`, `${text(place.attempts)} attempts`, `failed ${age(place.age)}`, `task ${text(place.task_id)}`);
        break;
      case "request_open":
        parts.push(`${text(place.recorded)} of ${text(place.request_images)} recorded`,
          `${text(place.completed)} completed, ${text(place.failed)} failed`);
        if (place.expires_in !== null) parts.push(`ends incomplete in ${Math.round(place.expires_in)} s without another image`);
        break;
      case "request_ended": {
        const record = place.record || {};
        parts.push(place.source
          ? `${text(record.status)}: ${text(record.images)} of ${text(record.request_images)} images at ${text(record.timestamp)}, from ${place.source}`
          : `ended ${new Date(place.ended_at * 1000).toLocaleString()}; its record is in the requests.json of the host that ended it`);
        break;
      }
      case "recorded": {
        const record = place.record || {};
        parts.push(`${text(record.status)} at ${text(record.timestamp)}`);
        if (record.error) parts.push(`error: ${record.error}`);
        if (place.file) parts.push(`file ${place.file}${place.file_here ? "" : " (not on this host)"}`);
        parts.push(`from ${place.source}`);
        break;
      }
      default:
        parts.push(JSON.stringify(place));
    }
    const image = place.image_id !== undefined ? place.image_id : (place.record || {}).image_id;
    const isRequest = text(place.state).startsWith("request");
    return el("div", { class: "place", "data-state": text(place.state) },
      el("span", { class: "state" }, text(place.state).replace("_", " ")),
      isRequest ? null : el("span", { class: "ident" }, `image ${text(image)} · `),
      parts.join(" · "));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", unlock);
    $("lock").addEventListener("click", lock);
    $("search-form").addEventListener("submit", search);
    armed($("requeue-all"), () => `Requeue ${number((state.data && state.data.totals || {}).dead)}? Click again`,
      () => post("/api/dead/requeue-all", {}));
    armed($("purge"), () => `Delete ${number((state.data && state.data.totals || {}).dead)}? Click again`,
      () => post("/api/dead/purge", {}));
    refresh();
    setInterval(refresh, REFRESH_MS);
  });
})();
