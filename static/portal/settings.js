// The settings page: times shown relative to now ("in 2 h 5 min"), and a note when the form has
// changes not saved yet.
(function () {
  "use strict";
  function relative(date) {
    const minutes = Math.round((date.getTime() - Date.now()) / 60000);
    const abs = Math.abs(minutes);
    const text = abs < 1 ? "less than a minute" : abs < 60 ? `${abs} min` : `${Math.floor(abs / 60)} h ${abs % 60} min`;
    return minutes >= 0 ? `in ${text}` : `${text} ago`;
  }
  function describe(node, date) {
    // A next check in the past means no worker has picked it up: say so.
    const overdue = node.closest("#next-check") && date.getTime() < Date.now() - 60000;
    return `${date.toLocaleString()} (${relative(date)}${overdue ? ", overdue: is a worker running?" : ""})`;
  }
  function refresh() {
    document.querySelectorAll("time[datetime]").forEach((node) => {
      const date = new Date(node.getAttribute("datetime"));
      if (Number.isNaN(date.getTime())) return;
      node.title = date.toLocaleString();
      node.textContent = describe(node, date);
    });
  }
  refresh();
  setInterval(refresh, 30000);

  const form = document.getElementById("settings-form");
  const unsaved = document.getElementById("unsaved");
  if (form && unsaved) {
    form.addEventListener("input", () => {
      unsaved.hidden = false;
    });
  }
})();
