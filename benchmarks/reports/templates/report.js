"use strict";
// Sortable tables: a column's heading button sorts the rows by the cells' data-sort values
// (numbers when every non-empty value is one; empty values last), toggling the direction.
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("thead th");
  heads.forEach(function (th, col) {
    var button = th.querySelector("button");
    if (!button) return;
    button.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(function (other) { other.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var cell = row.cells[col];
        return cell ? (cell.getAttribute("data-sort") || "") : "";
      };
      var numeric = rows.every(function (r) { var k = key(r); return k === "" || !isNaN(Number(k)); });
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "" || y === "") return (x === "") - (y === "");
        var c = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return ascending ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});

// The gallery: pick the methods shown, and overlay or map alone.
(function () {
  var form = document.getElementById("gallery-controls");
  if (!form) return;
  var boxes = form.querySelectorAll("input[name=method]");
  function show() {
    var shown = {};
    boxes.forEach(function (b) { shown[b.value] = b.checked; });
    document.querySelectorAll(".gallery .tile[data-method]").forEach(function (tile) {
      tile.hidden = !shown[tile.getAttribute("data-method")];
    });
  }
  boxes.forEach(function (b) { b.addEventListener("change", show); });
  form.querySelectorAll("button[data-pick]").forEach(function (button) {
    button.addEventListener("click", function () {
      var all = button.getAttribute("data-pick") === "all";
      boxes.forEach(function (b) { b.checked = all; });
      show();
    });
  });
  form.querySelectorAll("input[name=view]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      var alone = form.querySelector("input[name=view]:checked").value === "map";
      document.querySelectorAll(".gallery").forEach(function (g) {
        g.classList.toggle("map-only", alone);
      });
    });
  });
  show();
})();

// One (model, dataset) at a time: the picker hides the other groups' findings, tables,
// galleries and figures (every group is shown without the script, and in print).
(function () {
  var pick = document.getElementById("group-pick");
  if (!pick) return;
  var count = document.getElementById("group-count");
  function show() {
    var groups = document.querySelectorAll("[data-group]");
    groups.forEach(function (e) {
      e.hidden = pick.value !== "" && e.getAttribute("data-group") !== pick.value;
    });
    count.textContent = pick.value === "" ? "" :
      "showing one of " + (pick.options.length - 1) + "; pick another above";
  }
  pick.value = pick.getAttribute("data-default") || "";
  pick.addEventListener("change", show);
  show();
})();
