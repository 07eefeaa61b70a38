// jit-broker: progressive enhancement only. Every page works without this file: it adds the
// countdowns, local times, copy buttons, and hides request-form parts a choice does not need.
(function () {
  "use strict";

  function pad(n) { return n < 10 ? "0" + n : String(n); }

  function left(seconds) {
    if (seconds <= 0) return "ended";
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return (h ? h + "h " + pad(m) + "m " : m + "m ") + pad(s) + "s left";
  }

  // <time datetime="...Z" data-local>: the UTC value stays in the title (hover), the text is local.
  document.querySelectorAll("time[data-local]").forEach(function (el) {
    var when = new Date(el.getAttribute("datetime"));
    if (isNaN(when)) return;
    el.title = el.getAttribute("datetime").replace("T", " ").replace("Z", " UTC");
    el.textContent = when.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  });

  // <span class="countdown" data-until="...Z">: counts down to the window end.
  var timers = document.querySelectorAll("[data-until]");
  function tick() {
    var now = Date.now();
    timers.forEach(function (el) {
      var end = Date.parse(el.getAttribute("data-until"));
      if (!isNaN(end)) el.textContent = left(Math.round((end - now) / 1000));
    });
  }
  if (timers.length) { tick(); setInterval(tick, 1000); }

  // <button data-copy="ID" hidden>: copies the text of #ID.
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    if (!target || !navigator.clipboard) return;
    button.hidden = false;
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(target.textContent.trim()).then(function () {
        var label = button.textContent;
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = label; }, 2000);
      });
    });
  });
})();
