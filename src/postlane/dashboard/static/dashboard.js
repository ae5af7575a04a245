// postlane dashboard: refresh <main data-live> in place every few seconds (no framework).
// Pages work without this script: every action is a plain form, every number a reload away.
(function () {
  "use strict";
  var seconds = parseInt(document.body.dataset.refresh || "5", 10);
  var live = document.getElementById("live");

  function busy(main) {
    // never swap the page under a user who is typing, choosing or has ticked boxes
    var active = document.activeElement;
    if (active && main.contains(active) && /INPUT|SELECT|TEXTAREA|BUTTON/.test(active.tagName)) {
      return true;
    }
    if (main.querySelector("input[type=checkbox]:checked")) return true;
    var selection = window.getSelection && window.getSelection();
    return !!(selection && selection.toString());
  }

  function refresh() {
    var main = document.getElementById("main");
    if (!main || !main.hasAttribute("data-live") || document.hidden || busy(main)) return;
    fetch(window.location.href, { headers: { "X-Postlane-Live": "1" }, credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok || response.redirected) throw new Error(String(response.status));
        return response.text();
      })
      .then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.getElementById("main");
        var stamp = page.getElementById("live");
        if (!fresh || busy(main)) return;
        main.innerHTML = fresh.innerHTML;
        if (live && stamp) {
          live.textContent = stamp.textContent;
          live.classList.remove("stale");
        }
        document.dispatchEvent(new CustomEvent("postlane:refreshed"));
      })
      .catch(function () {
        if (live) {
          live.classList.add("stale");
          live.title = "cannot reach postlane: the numbers are stale";
        }
      });
  }

  if (seconds > 0) window.setInterval(refresh, seconds * 1000);
})();
