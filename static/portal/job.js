// The job page: render the job's state, then every update the websocket /ws/jobs/<id>/ brings,
// without reloading. `window.jobLive.updates` keeps each message with the time it arrived
// (epoch milliseconds), which the browser test reads to measure the delay.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const initial = JSON.parse($("job-state").textContent);
  const live = (window.jobLive = { updates: [], state: null, connected: false });
  const log = $("job-log");
  let speed = null;
  let retryDelay = 500;

  function size(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function note(text) {
    const item = document.createElement("li");
    const when = document.createElement("time");
    when.textContent = new Date().toLocaleTimeString();
    item.append(when, " ", text);
    log.append(item);
  }

  function updateSpeed(previous, state) {
    // Bytes per second between two updates, by the server's clock, smoothed.
    if (!previous || state.phase !== "downloading" || previous.phase !== state.phase) {
      speed = state.phase === "downloading" ? speed : null;
      return;
    }
    const bytes = state.bytes_done - previous.bytes_done;
    const seconds = state.at - previous.at;
    if (bytes > 0 && seconds > 0) {
      const now = bytes / seconds;
      speed = speed === null ? now : 0.5 * speed + 0.5 * now;
    }
  }

  function elapsed(state) {
    if (!state.started_at) return "";
    const start = Date.parse(state.started_at);
    const end = state.finished_at ? Date.parse(state.finished_at) : Date.now();
    return `${state.finished_at ? "took" : "running for"} ${duration((end - start) / 1000)}`;
  }

  function render(state) {
    const previous = live.state;
    updateSpeed(previous, state);
    live.state = state;
    const status = $("job-status");
    status.textContent = state.status_label;
    status.className = `badge status status-${state.status}`;
    $("job-phase").textContent = state.phase_label;
    $("job-progress").value = state.percent;
    $("job-percent").textContent = `${state.percent.toFixed(1)}%`;
    $("job-bytes").textContent =
      state.kind !== "check" && state.bytes_total > 0
        ? `${size(state.bytes_done)} of ${size(state.bytes_total)}`
        : "";
    $("job-speed").textContent = state.active && speed ? `${size(speed)}/s` : "";
    $("job-elapsed").textContent = elapsed(state);
    $("job-message").textContent = state.message;
    $("job-message").hidden = !state.active; // the outcome below says it once the job is over
    if (state.to_version) $("job-to").textContent = state.to_version;
    if (state.source) $("job-source").textContent = state.source;
    if (previous && previous.phase !== state.phase) note(`${state.phase_label}`);
    if (state.message && (!previous || previous.message !== state.message)) note(state.message);
    if (state.error && (!previous || previous.error !== state.error)) note(state.error);
    const outcome = $("outcome");
    outcome.hidden = state.active;
    if (!state.active) {
      outcome.className = `outcome outcome-${state.status}`;
      $("outcome-title").textContent = state.status_label.charAt(0).toUpperCase() + state.status_label.slice(1);
      $("outcome-text").textContent = state.error || state.message;
      const cancel = $("cancel-form");
      if (cancel) cancel.hidden = true;
    }
  }

  function showLive(text) {
    $("live-state").textContent = text;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/jobs/${initial.id}/`);
    socket.onopen = () => {
      live.connected = true;
      retryDelay = 500;
      showLive(live.state.active ? "live" : "finished");
    };
    socket.onmessage = (event) => {
      const state = JSON.parse(event.data);
      live.updates.push({ received: performance.timeOrigin + performance.now(), state });
      render(state);
      if (!state.active) showLive("finished");
    };
    socket.onclose = () => {
      live.connected = false;
      if (!live.state.active) return;
      // Restarted server, dropped connection: come back, and get the current state on connect.
      showLive("reconnecting…");
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    };
  }

  render(initial);
  setInterval(() => {
    if (live.state.active) $("job-elapsed").textContent = elapsed(live.state);
  }, 1000);
  if (initial.active) connect();
  else showLive("finished");
})();
