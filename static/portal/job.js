// Live jobs, for the job page, the admin's job view and the admin's dashboard (one script for all).
//
// `#job-card` (templates/includes/job_live.html): the job's state, then every update the websocket
// /ws/jobs/<id>/ brings, without reloading: status, phase, progress, the log lines as the server
// stamped them, and a fan-out's children. `window.jobLive.updates` keeps each message with the time
// it arrived (epoch milliseconds), which the browser tests read to measure the delay.
//
// `[data-live-job="<id>"]` elements (the dashboard's running jobs): their `.live-status`,
// `progress` and `.live-percent` follow the job the same way.
(function () {
  "use strict";

  // Sizes as backends_app/templatetags/portal_format.py says them: binary units, one decimal.
  function size(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = bytes;
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit ? 1 : 0)}\u00a0${units[unit]}`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function capitalized(text) {
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  // Follow one job: call onState with each state the server sends; reconnect with back-off while
  // the job is active (a restarted server, a dropped connection), getting the current state again.
  function watch(jobId, onState, onLink) {
    const link = { connected: false, active: true };
    let retryDelay = 500;
    function connect() {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const socket = new WebSocket(`${scheme}://${location.host}/ws/jobs/${jobId}/`);
      socket.onopen = () => {
        link.connected = true;
        retryDelay = 500;
        onLink("open");
      };
      socket.onmessage = (event) => {
        const state = JSON.parse(event.data);
        link.active = state.active;
        onState(state);
      };
      socket.onclose = () => {
        link.connected = false;
        if (!link.active) {
          onLink("closed");
          return;
        }
        onLink("reconnecting");
        setTimeout(connect, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 10000);
      };
    }
    connect();
    return link;
  }

  function jobCard() {
    const $ = (id) => document.getElementById(id);
    const initial = JSON.parse($("job-state").textContent);
    const live = (window.jobLive = { updates: [], state: null, connected: false });
    const log = $("job-log");
    let lastLogId = 0;
    log.querySelectorAll("li[data-id]").forEach((item) => {
      lastLogId = Math.max(lastLogId, Number(item.dataset.id));
    });
    let speed = null;

    function addLogLines(entries) {
      for (const entry of entries || []) {
        if (entry.id <= lastLogId) continue;
        lastLogId = entry.id;
        const item = document.createElement("li");
        item.dataset.id = entry.id;
        item.className = `log-${entry.kind}`;
        const when = document.createElement("time");
        when.dateTime = entry.at;
        when.textContent = entry.at_display;
        const text = document.createElement("span");
        text.className = "text";
        text.textContent = entry.text;
        item.append(when, " ", text);
        log.append(item);
        log.scrollTop = log.scrollHeight;
      }
    }

    function updateChildren(children) {
      for (const child of children || []) {
        const row = document.querySelector(`[data-child="${child.id}"]`);
        if (!row) continue;
        const badge = row.querySelector(".child-status");
        badge.textContent = child.status_label;
        badge.className = `badge status status-${child.status} child-status`;
        row.querySelector(".child-percent").textContent = `${Math.round(child.percent)}%`;
        row.querySelector(".child-error").textContent = child.error;
      }
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

    // The Started and Finished rows: the server's moment in the portal's format, or a dash.
    function showMoment(id, iso, display) {
      const cell = $(id);
      if (!iso) {
        cell.textContent = "\u2013";
        return;
      }
      const when = document.createElement("time");
      when.dateTime = iso;
      when.textContent = display;
      cell.replaceChildren(when);
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
      showMoment("job-started", state.started_at, state.started_at_display);
      showMoment("job-finished", state.finished_at, state.finished_at_display);
      addLogLines(state.log);
      updateChildren(state.children);
      const outcome = $("outcome");
      outcome.hidden = state.active;
      if (!state.active) {
        outcome.className = `outcome outcome-${state.status}`;
        $("outcome-title").textContent = capitalized(state.status_label);
        $("outcome-text").textContent = state.error || state.message;
        const cancel = $("cancel-form");
        if (cancel) cancel.hidden = true;
      }
    }

    function showLive(text) {
      $("live-state").textContent = text;
    }

    render(initial);
    setInterval(() => {
      if (live.state.active) $("job-elapsed").textContent = elapsed(live.state);
    }, 1000);
    if (!initial.active) {
      showLive("finished");
      return;
    }
    const link = watch(
      initial.id,
      (state) => {
        live.updates.push({ received: performance.timeOrigin + performance.now(), state });
        render(state);
        if (!state.active) showLive("finished");
      },
      (what) => {
        live.connected = link.connected;
        if (what === "open") showLive(live.state.active ? "live" : "finished");
        else if (what === "reconnecting") showLive("reconnecting…");
      },
    );
  }

  function liveRow(row) {
    const status = row.querySelector(".live-status");
    const bar = row.querySelector("progress");
    const percent = row.querySelector(".live-percent");
    watch(
      Number(row.dataset.liveJob),
      (state) => {
        if (status) {
          status.textContent = state.status_label;
          status.className = `badge status status-${state.status} live-status`;
        }
        if (bar) bar.value = state.percent;
        if (percent) percent.textContent = `${state.percent.toFixed(0)}%`;
        row.dataset.liveStatus = state.status;
      },
      () => {},
    );
  }

  if (document.getElementById("job-card")) jobCard();
  document.querySelectorAll("[data-live-job]").forEach(liveRow);
})();
