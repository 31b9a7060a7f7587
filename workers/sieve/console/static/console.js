// Keyboard shortcuts for the review console: a key with a [data-key] button presses it.
// Digits pick a choice on the item page; c claims, r releases, n takes the next item.
// Keys typed into a field (the note, a select) are left alone.
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.choice");
    if (!button) { return; }
    var form = button.form;
    var hidden = form.querySelector("input.chosen-route");
    if (hidden) { hidden.value = button.getAttribute("data-route") || ""; }
    form.querySelectorAll("input[type=checkbox][name=routes]").forEach(function (box) {
      box.disabled = true; // a choice button decides on its own route only
    });
  });
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT")) {
      return;
    }
    var button = document.querySelector('button[data-key="' + CSS.escape(event.key) + '"]');
    if (button) {
      event.preventDefault();
      button.click();
    }
  });
})();
