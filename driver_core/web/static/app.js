// coap-driver web panel: optional enhancements. Every page works without this file.
"use strict";

(function () {
  // Confirmation before destructive small forms (the page still works without it).
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });

  // Commands tab: the parameter follows the chosen command (1 for commands, the default otherwise).
  var command = document.getElementById("f-command");
  var parameter = document.getElementById("f-parameter");
  var help = document.getElementById("f-parameter-help");
  if (command && parameter && help) {
    var original = help.textContent;
    var apply = function (initial) {
      var option = command.options[command.selectedIndex];
      if (!option || !option.value) { help.textContent = original; return; }
      help.textContent = (option.dataset.description ? option.dataset.description + " — " : "") +
        "Allowed: " + option.dataset.accepts;
      if (!initial) {
        if (option.dataset.kind === "command") parameter.value = "1";
        else if (option.dataset.default) parameter.value = option.dataset.default;
        else parameter.value = "";
      }
    };
    command.addEventListener("change", function () { apply(false); });
    apply(true);
  }

  // Live updates on the device pages (server-sent events).
  var live = document.querySelector("[data-live-src]");
  if (!live || !window.EventSource) return;
  var broken = false;
  var source = new EventSource(live.dataset.liveSrc);
  var fragment = function (html) {
    var body = document.createElement("tbody");
    body.innerHTML = html.trim();
    return body.firstElementChild;
  };
  var dropEmpty = function (table) {
    var empty = table && table.closest(".table-wrap") && table.closest(".table-wrap").parentNode.querySelector("[data-empty]");
    if (empty) empty.remove();
  };
  source.addEventListener("open", function () {
    if (broken) { window.location.reload(); return; }  // something may have been missed
    document.body.dataset.live = "open";
  });
  source.addEventListener("error", function () {
    broken = true;
    document.body.dataset.live = "reconnecting";
  });
  source.addEventListener("uplink", function (event) {
    var data = JSON.parse(event.data);
    var rows = document.querySelector("[data-live-uplinks]");
    if (rows) {
      var row = fragment(data.row);
      row.classList.add("flash");
      rows.insertBefore(row, rows.firstChild);
      dropEmpty(rows);
    }
    var latest = document.getElementById("latest-data");
    if (latest && data.latest) latest.innerHTML = data.latest;
    var seen = document.getElementById("last-seen");
    if (seen && data.last_seen) seen.innerHTML = data.last_seen;
  });
  source.addEventListener("downlink", function (event) {
    var data = JSON.parse(event.data);
    var rows = document.querySelector("[data-live-downlinks]");
    if (!rows) return;
    var row = fragment(data.row);
    row.classList.add("flash");
    var existing = null;
    rows.querySelectorAll("tr[data-command-id]").forEach(function (tr) {
      if (tr.dataset.commandId === data.command_id) existing = tr;
    });
    if (existing) existing.replaceWith(row);
    else { rows.insertBefore(row, rows.firstChild); dropEmpty(rows); }
  });
  source.addEventListener("fota", function (event) {
    var data = JSON.parse(event.data);
    var box = document.getElementById("firmware-status");
    if (box && data.html) box.innerHTML = data.html;
  });
  window.addEventListener("pagehide", function () { source.close(); });
})();
