// The backends page: confirm destructive buttons, apply the "updates only" filter when ticked, keep
// the search box focused after a search, and keep the rows current while jobs run by polling
// /live/backends/ (the same JSON whatever the channel layer: it reads the database).
(function () {
  "use strict";
  const script = document.getElementById("backends-script");
  const liveUrl = script ? script.dataset.liveUrl : "";
  const FAST = 1000; // while a job or a gallery sync is under way
  const SLOW = 2000; // otherwise: a job started elsewhere (the API, the schedule) shows within this

  function confirmBeforeSubmit(form) {
    if (form.dataset.confirmBound) return;
    form.dataset.confirmBound = "1";
    form.addEventListener("submit", (event) => {
      if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  // A button pressed twice would ask twice; the second answer is "already queued" anyway.
  function busyOnSubmit(form) {
    if (form.dataset.busyBound) return;
    form.dataset.busyBound = "1";
    form.addEventListener("submit", (event) => {
      if (event.defaultPrevented) return;
      form.querySelectorAll("button:not([disabled])").forEach((button) => {
        button.disabled = true;
        button.dataset.busy = "1";
      });
    });
  }
  function bind(root) {
    root.querySelectorAll("form[data-confirm]").forEach(confirmBeforeSubmit);
    root.querySelectorAll("form[method=post]").forEach(busyOnSubmit);
  }
  bind(document);
  document.querySelectorAll("[data-autosubmit]").forEach((input) => {
    input.addEventListener("change", () => input.form.submit());
  });
  // Back to this page from the history: its buttons work again.
  window.addEventListener("pageshow", () => {
    document.querySelectorAll("button[data-busy]").forEach((button) => {
      button.disabled = false;
      delete button.dataset.busy;
    });
  });
  const search = document.getElementById("gallery-search");
  if (search && search.value) search.focus();

  // --- live rows -------------------------------------------------------------------------------
  const live = { polls: 0, updates: 0, lastState: null };
  window.backendsLive = live;
  const announcer = document.getElementById("announcer");
  const tbody = document.querySelector("#installed tbody");
  const initial = document.getElementById("backends-live-state");
  const initialState = initial ? JSON.parse(initial.textContent) : {};
  let active = Boolean(initialState.active);
  // The galleries' list as the page was rendered; a sync that changes it (first sync of a fresh
  // portal included, even one that started after the page loaded) reloads the page once it ends.
  let listedKey = JSON.stringify(initialState.galleries || null);
  let syncingAtLoad = Boolean(document.getElementById("syncing"));
  const jobTexts = new Map(); // row key -> the job text last announced

  function announce(text) {
    if (announcer && text) announcer.textContent = text;
  }
  function fromHtml(html) {
    const template = document.createElement("template");
    template.innerHTML = `<table><tbody>${html}</tbody></table>`;
    return template.content.querySelector("tr");
  }
  function busy(element) {
    // A row whose form is being submitted, or that holds the focus, is left alone until next time.
    return element.querySelector("button[data-busy]") || element.contains(document.activeElement);
  }
  function updateRows(rows) {
    if (!tbody) return;
    const current = Array.from(tbody.querySelectorAll("tr[data-key]"));
    const keys = current.map((tr) => tr.dataset.key).join("|");
    const wanted = rows.map((row) => row.key).join("|");
    if (keys !== wanted) {
      if (current.some(busy)) return;
      tbody.innerHTML = rows.length
        ? rows.map((row) => row.html).join("")
        : '<tr class="empty-row"><td colspan="6" class="empty">Nothing installed.</td></tr>';
      bind(tbody);
      live.updates += 1;
    } else {
      rows.forEach((row, index) => {
        const tr = current[index];
        if (tr.dataset.sig === row.sig || busy(tr)) return;
        const replacement = fromHtml(row.html);
        tr.replaceWith(replacement);
        bind(replacement);
        live.updates += 1;
      });
    }
    rows.forEach((row) => {
      const text = row.job ? `${row.name} on ${row.node}: ${row.job.text}` : "";
      const before = jobTexts.get(row.key);
      if (before !== undefined && before !== text) {
        announce(text || `${row.name} on ${row.node}: ${row.label}`);
      }
      jobTexts.set(row.key, text);
    });
  }
  function updateGalleryRows(jobs) {
    const installing = new Map(jobs.filter((job) => job.kind === "install").map((job) => [String(job.backend_id), job]));
    document.querySelectorAll("#gallery tr[data-backend-id]").forEach((tr) => {
      const job = installing.get(tr.dataset.backendId);
      const cell = tr.querySelector(".job-cell");
      if (!cell || !job) return;
      let link = cell.querySelector("a.job-link");
      if (!link) {
        cell.textContent = "";
        link = document.createElement("a");
        link.className = "job-link";
        cell.appendChild(link);
      }
      link.href = job.url;
      link.textContent = `${job.text} →`;
    });
  }
  function updateHead(state) {
    const count = document.getElementById("upgradable");
    if (count) {
      count.textContent = String(state.upgradable);
      const button = document.getElementById("upgrade-all");
      if (button && !button.dataset.busy) button.disabled = state.upgradable === 0;
    }
    const check = document.getElementById("check-job");
    if (check) {
      check.textContent = "";
      if (state.check_job) {
        const link = document.createElement("a");
        link.href = state.check_job.url;
        link.textContent = `check #${state.check_job.id} ${state.check_job.status}`;
        check.append("· ", link);
      }
    }
    const last = document.getElementById("last-check");
    if (last && state.last_check) {
      const time = last.querySelector("time");
      if (!time || time.getAttribute("datetime") !== state.last_check.at) {
        last.textContent = "";
        const node = document.createElement("time");
        node.setAttribute("datetime", state.last_check.at);
        node.textContent = "just now";
        last.append(node);
        if (state.last_check.by) last.append(` by ${state.last_check.by}`);
      }
    }
  }
  function updateGalleries(galleries, key) {
    const syncing = galleries.some((gallery) => gallery.enabled && gallery.pending);
    const now = JSON.stringify(key);
    if (!syncing && (syncingAtLoad || (initialState.galleries && now !== listedKey))) {
      listedKey = now;
      syncingAtLoad = false;
      // A sync is over and the galleries' list or errors changed: show the new page.
      window.location.reload();
    }
  }
  async function poll() {
    if (!liveUrl) return;
    if (document.hidden) {
      setTimeout(poll, FAST);
      return;
    }
    try {
      const query = new URLSearchParams(window.location.search);
      const params = new URLSearchParams({ next: window.location.pathname + window.location.search });
      if (query.get("updates") === "1") params.set("updates", "1");
      const response = await fetch(`${liveUrl}?${params}`, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok && (response.headers.get("Content-Type") || "").includes("application/json")) {
        const state = await response.json();
        live.polls += 1;
        live.lastState = state;
        active = state.active;
        updateRows(state.rows);
        updateGalleryRows(state.jobs);
        updateHead(state);
        updateGalleries(state.galleries, state.galleries_key);
      }
    } catch (error) {
      // The server is restarting or the network dropped: try again at the slow pace.
      active = false;
    }
    setTimeout(poll, active ? FAST : SLOW);
  }
  if (liveUrl && tbody) setTimeout(poll, active ? FAST : SLOW);
})();
