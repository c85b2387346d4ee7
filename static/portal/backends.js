// The backends page: confirm destructive buttons, apply the "updates only" filter when ticked,
// and keep the page focused on the search box after a search.
(function () {
  "use strict";
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
  document.querySelectorAll("[data-autosubmit]").forEach((input) => {
    input.addEventListener("change", () => input.form.submit());
  });
  // A button pressed twice would ask twice; the second answer is "already queued" anyway.
  document.querySelectorAll("form[method=post]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (event.defaultPrevented) return;
      form.querySelectorAll("button:not([disabled])").forEach((button) => {
        button.disabled = true;
        button.dataset.busy = "1";
      });
    });
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
})();
