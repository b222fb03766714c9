/* attnlab report: lays out the recorded walkthrough steps (data made by attnlab.report.html).
 *
 * It computes no attention: every number, label, formula and "how this number is made" line comes
 * from the data; this script only builds the DOM, colours the cells and reacts to pointer and keyboard.
 * Everything is scoped to `root` (one report's container), so several reports can share a page.
 */
function attnlabReport(root, data) {
  "use strict";
  var uid = root.id;
  var state = { token: data.query, heads: {} };  // followed token; selected head per section
  var nTok = data.labels.length;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") node.textContent = v;
        else if (k === "cls") node.className = v;
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : v);
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  // ---------------------------------------------------------------- colours
  function colorOf(step, v) {
    var lo = step.vmin, hi = step.vmax;
    var t = hi > lo ? (v - lo) / (hi - lo) : 1;
    t = Math.max(0, Math.min(1, t));
    return data.colors[Math.round(t * (data.colors.length - 1))];
  }
  function inkOn(hex) {
    var r = parseInt(hex.slice(1, 3), 16) / 255, g = parseInt(hex.slice(3, 5), 16) / 255,
      b = parseInt(hex.slice(5, 7), 16) / 255;
    return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 ? "#111" : "#fff";
  }
  function gradient() {
    var stops = data.colors.filter(function (_, i) { return i % 8 === 0 || i === data.colors.length - 1; });
    return "linear-gradient(to right, " + stops.join(", ") + ")";
  }

  // ---------------------------------------------------------------- shapes
  function size(shape) { return shape.reduce(function (a, b) { return a * b; }, 1); }
  function leadIndices(step) {  // every index of the axes before the last two: one panel each
    var lead = step.shape.slice(0, -2), out = [[]];
    lead.forEach(function (n) {
      var next = [];
      out.forEach(function (prefix) { for (var i = 0; i < n; i++) next.push(prefix.concat([i])); });
      out = next;
    });
    return out;
  }
  function flat(step, index) {
    var k = 0;
    for (var a = 0; a < index.length; a++) k = k * step.shape[a] + index[a];
    return k;
  }
  function panelName(step, lead) {
    return lead.map(function (i, a) { return step.axes[a] + " " + step.labels[a][i]; }).join(", ");
  }
  function isTokenAxis(step, axis) {
    var name = step.axes[axis];
    return (name === "query" || name === "token") && step.labels[axis].length === nTok;
  }

  // ---------------------------------------------------------------- tooltip (hover / focus / tap)
  var tip = el("div", { cls: "ar-tooltip", role: "tooltip", id: uid + "-tip", hidden: true });
  function hoverLines(step, k) {
    var lines = [], seen = 0, s = step;
    var chain = [];
    while (s && s.hover && seen < 8) { chain.unshift(s.hover[k]); s = s.chain ? data.steps[s.chain] : null; seen++; }
    chain.forEach(function (ls) { lines = lines.concat(ls); });
    return lines;
  }
  function showTip(cell) {
    var step = data.steps[cell.getAttribute("data-step")], k = +cell.getAttribute("data-k");
    tip.textContent = "";
    var name = cell.getAttribute("aria-label");
    tip.appendChild(el("div", { cls: "ar-tip-title", text: name }));
    if (step.masked && step.masked[k]) {
      tip.appendChild(el("div", { cls: "ar-tip-note", text: "masked: a future token, hidden by the causal mask" }));
    }
    var lines = data.hover ? hoverLines(step, k) : [];
    if (lines.length) {
      lines.forEach(function (line) { tip.appendChild(el("div", { cls: "ar-tip-line", text: line })); });
    } else {
      tip.appendChild(el("div", { cls: "ar-tip-line", text: step.formula }));
    }
    tip.hidden = false;
    var box = root.getBoundingClientRect(), c = cell.getBoundingClientRect();
    var width = Math.min(tip.offsetWidth, box.width - 8);
    var left = c.left - box.left + c.width / 2 - width / 2;
    left = Math.max(4, Math.min(left, box.width - width - 4));
    var top = c.bottom - box.top + 6;
    var below = window.innerHeight - c.bottom;
    if (below < tip.offsetHeight + 12 && c.top > tip.offsetHeight + 12) top = c.top - box.top - tip.offsetHeight - 6;
    tip.style.left = left + "px";
    tip.style.top = top + "px";
  }
  function hideTip() { tip.hidden = true; }

  // ---------------------------------------------------------------- token selection
  function tokenButton(i, label, extraCls) {
    return el("button", {
      type: "button", cls: "ar-tok " + (extraCls || ""), "data-token": i, text: label,
      "aria-pressed": i === state.token ? "true" : "false",
      title: "follow " + label + ": show its step-by-step computation",
      onclick: function () { selectToken(i); }
    });
  }
  function selectToken(i) {
    state.token = i;
    root.querySelectorAll(".ar-tok").forEach(function (b) {
      b.setAttribute("aria-pressed", +b.getAttribute("data-token") === i ? "true" : "false");
    });
    root.querySelectorAll("tr[data-token]").forEach(function (tr) {
      tr.classList.toggle("ar-sel", +tr.getAttribute("data-token") === i);
    });
    data.sections.forEach(renderFollow);
  }

  // ---------------------------------------------------------------- heads
  function selectHead(sec, h) {
    state.heads[sec.id] = h;
    var box = root.querySelector('[data-section="' + sec.id + '"]');
    box.querySelectorAll(".ar-head-btn").forEach(function (b) {
      b.setAttribute("aria-pressed", +b.getAttribute("data-head") === h ? "true" : "false");
    });
    box.querySelectorAll(".ar-panel[data-head]").forEach(function (p) {
      p.hidden = +p.getAttribute("data-head") !== h;
      if (!p.hidden) p.attnlabBuild();
    });
    box.querySelectorAll("tr[data-token]").forEach(function (tr) {
      tr.classList.toggle("ar-sel", +tr.getAttribute("data-token") === state.token);
    });
    box.querySelectorAll(".ar-mini[data-head]").forEach(function (m) {
      m.classList.toggle("ar-mini-on", +m.getAttribute("data-head") === h);
      m.setAttribute("aria-pressed", +m.getAttribute("data-head") === h ? "true" : "false");
    });
    renderFollow(sec);
  }

  // ---------------------------------------------------------------- tables
  function colorBar(step) {
    var bar = el("div", { cls: "ar-colorbar", "aria-hidden": "true" }, [
      el("span", { cls: "ar-cb-lo", text: fmtEnd(step.vmin) }),
      el("span", { cls: "ar-cb-grad", style: "background:" + gradient() }),
      el("span", { cls: "ar-cb-hi", text: fmtEnd(step.vmax) })
    ]);
    if (step.masked) bar.appendChild(el("span", { cls: "ar-cb-masked", text: "masked" }));
    return bar;
  }
  function fmtEnd(v) { return Math.abs(v - Math.round(v)) < 1e-9 ? String(Math.round(v)) : v.toFixed(4); }

  function buildTable(step, lead, caption) {
    var rows = step.shape[step.shape.length - 2], cols = step.shape[step.shape.length - 1];
    var rAxis = step.shape.length - 2, cAxis = rAxis + 1;
    var rowTokens = isTokenAxis(step, rAxis);
    var table = el("table", {
      cls: step.map ? "ar-map" : "ar-table", role: step.map ? "grid" : null,
      "aria-label": step.title + (caption ? " (" + caption + ")" : "")
    });
    var head = el("tr", null, [el("th", { cls: "ar-corner", scope: "col" }, [
      el("span", { cls: "ar-axis", text: step.map ? "query ↓ key →" : "" })])]);
    for (var j = 0; j < cols; j++) head.appendChild(el("th", { scope: "col", text: step.labels[cAxis][j] }));
    table.appendChild(el("thead", null, [head]));
    var body = el("tbody");
    var first = true;
    for (var i = 0; i < rows; i++) {
      var rowLabel = step.labels[rAxis][i];
      var tokenIndex = rowTokens ? i : (step.axes[rAxis] === "query" && rows === 1 ? data.query : -1);
      var th = el("th", { scope: "row" }, [
        tokenIndex >= 0 ? tokenButton(tokenIndex, rowLabel, "ar-tok-row") : rowLabel
      ]);
      var tr = el("tr", tokenIndex >= 0 ? { "data-token": tokenIndex } : null, [th]);
      if (tokenIndex === state.token) tr.classList.add("ar-sel");
      for (var c = 0; c < cols; c++) {
        var k = flat(step, lead.concat([i, c]));
        var text = step.text[k];
        var td = el("td", { text: text });
        if (step.map) {
          var masked = step.masked && step.masked[k];
          var v = step.values[k];
          var name = (caption ? caption + ": " : "") + step.symbol + "(" + rowLabel + ", " + step.labels[cAxis][c] + ") = " + text;
          td.setAttribute("role", "gridcell");
          td.setAttribute("data-step", step.id);
          td.setAttribute("data-k", k);
          td.setAttribute("data-r", i);
          td.setAttribute("data-c", c);
          td.setAttribute("aria-label", name + (masked ? " (masked)" : ""));
          td.setAttribute("aria-describedby", uid + "-tip");
          td.tabIndex = first ? 0 : -1;
          first = false;
          if (masked || v === null) {
            td.className = "ar-masked";
          } else {
            var bg = colorOf(step, v);
            td.style.background = bg;
            td.style.color = inkOn(bg);
          }
        }
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    table.appendChild(body);
    return table;
  }

  function buildMini(step, lead, sec) {
    var rows = step.shape[step.shape.length - 2], cols = step.shape[step.shape.length - 1];
    var h = lead[step.head_axis];
    var grid = el("div", { cls: "ar-mini-grid", style: "grid-template-columns:repeat(" + cols + ", 1fr)" });
    for (var i = 0; i < rows; i++) {
      for (var c = 0; c < cols; c++) {
        var k = flat(step, lead.concat([i, c]));
        var cell = el("span", { cls: "ar-mini-cell" });
        if ((step.masked && step.masked[k]) || step.values[k] === null) cell.classList.add("ar-masked");
        else cell.style.background = colorOf(step, step.values[k]);
        grid.appendChild(cell);
      }
    }
    return el("button", {
      type: "button", cls: "ar-mini", "data-head": h, "aria-pressed": "false",
      "aria-label": "show " + panelName(step, lead),
      onclick: function () { selectHead(sec, h); }
    }, [el("span", { cls: "ar-mini-title", text: panelName(step, lead) }), grid]);
  }

  function buildStep(step, sec) {
    var wide = step.shape[step.shape.length - 1] > 8;
    var cls = "ar-step" + (step.map ? " ar-step-map" : "") + (wide ? " ar-step-wide" : "");
    var card = el("article", { cls: cls, "data-step": step.id }, [
      el("h3", null, [step.title + " ", el("code", { cls: "ar-id", text: step.id })]),
      step.why ? el("p", { cls: "ar-why", text: step.why }) : null,
      step.formula ? el("p", { cls: "ar-formula" }, [el("code", { text: step.formula })]) : null
    ]);
    var views = el("div", { cls: "ar-views" });
    var leads = leadIndices(step);
    leads.forEach(function (lead) {
      var caption = panelName(step, lead);
      var attrs = { cls: "ar-panel" };
      var perHead = step.head_axis !== null && step.head_axis < lead.length;
      if (perHead) attrs["data-head"] = lead[step.head_axis];
      var scroll = el("div", { cls: "ar-scroll" });
      var fig = el("figure", attrs, [
        caption ? el("figcaption", { text: caption }) : null,
        scroll,
        step.map ? colorBar(step) : null
      ]);
      // a head's tables are built when the head is first shown (many heads x layers stay light)
      fig.attnlabBuild = function () {
        if (!scroll.firstChild) scroll.appendChild(buildTable(step, lead, caption));
      };
      if (!perHead) fig.attnlabBuild();
      else fig.hidden = true;
      views.appendChild(fig);
    });
    card.appendChild(views);
    if (step.map && step.head_axis !== null && leads.length > 1) {
      var multiples = el("div", { cls: "ar-multiples" + (leads.length > 16 ? " ar-multiples-many" : ""),
        role: "group", "aria-label": "all heads side by side" });
      if (leads[0].length === 2) {  // layers x heads: one row per layer, one column per head
        multiples.classList.add("ar-multiples-grid");
        multiples.style.gridTemplateColumns = "repeat(" + step.shape[1] + ", max-content)";
      }
      leads.forEach(function (lead) { multiples.appendChild(buildMini(step, lead, sec)); });
      card.appendChild(el("div", { cls: "ar-multiples-box" }, [
        el("p", { cls: "ar-multiples-title", text: "All heads side by side (click one to show it above):" }),
        multiples
      ]));
    }
    if (step.detail && step.detail.length) {
      card.appendChild(el("ul", { cls: "ar-detail" }, step.detail.map(function (d) { return el("li", { text: d }); })));
    }
    return card;
  }

  // ---------------------------------------------------------------- "follow a token" panel
  function renderFollow(sec) {
    var box = root.querySelector('[data-section="' + sec.id + '"] .ar-follow');
    if (!box) return;
    var t = state.token, label = data.labels[t];
    var h = state.heads[sec.id];
    var items = (sec.follow[t] || []).filter(function (it) { return it.head === null || it.head === h; });
    box.textContent = "";
    box.appendChild(el("h3", { cls: "ar-follow-title" }, [
      "Step by step for ", el("span", { cls: "ar-follow-token", text: label }),
      sec.heads.length ? " (head " + sec.heads[h] + ")" : ""
    ]));
    if (!items.length) {
      var only = (sec.follow[data.query] || []).length;
      box.appendChild(el("p", { cls: "ar-note", text: only
        ? "This section follows the query “" + data.labels[data.query] + "” only (choose another with --query); click it to see its numbers."
        : "No step of this section has a row for a single token." }));
      return;
    }
    var list = el("ol", { cls: "ar-follow-list" });
    items.forEach(function (it) {
      list.appendChild(el("li", null, [
        el("span", { cls: "ar-follow-step", text: it.title }),
        it.formula ? el("code", { cls: "ar-follow-formula", text: it.formula }) : null,
        el("div", { cls: "ar-follow-lines" }, it.lines.map(function (l) { return el("div", { text: l }); }))
      ]));
    });
    box.appendChild(list);
  }

  // ---------------------------------------------------------------- keyboard in a grid
  function onGridKey(ev) {
    var td = ev.target;
    if (td.tagName !== "TD" || !td.hasAttribute("data-k")) {
      if (ev.key === "Escape") hideTip();
      return;
    }
    var table = td.closest("table");
    var r = +td.getAttribute("data-r"), c = +td.getAttribute("data-c");
    var moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (ev.key === "Escape") { hideTip(); return; }
    if (ev.key === "Enter" || ev.key === " ") {
      var tr = td.parentNode;
      if (tr.hasAttribute("data-token")) selectToken(+tr.getAttribute("data-token"));
      ev.preventDefault();
      td.focus();
      return;
    }
    var move = moves[ev.key];
    if (ev.key === "Home") move = [0, -c];
    if (ev.key === "End") move = [0, 1000];
    if (!move) return;
    var cells = table.querySelectorAll("td[data-k]");
    var rows = table.tBodies[0].rows.length, cols = cells.length / rows;
    var nr = Math.max(0, Math.min(rows - 1, r + move[0])), nc = Math.max(0, Math.min(cols - 1, c + move[1]));
    var next = cells[nr * cols + nc];
    if (next && next !== td) {
      td.tabIndex = -1;
      next.tabIndex = 0;
      next.focus();
    }
    ev.preventDefault();
  }

  // ---------------------------------------------------------------- the page
  var loading = root.querySelector(".attnlab-loading");
  if (loading) loading.parentNode.removeChild(loading);
  var app = el("div", { cls: "ar-app" });
  root.appendChild(app);
  root.classList.add("ar-ready");
  var toc = el("nav", { cls: "ar-toc", "aria-label": "sections" }, [el("ol", null, data.sections.map(function (sec) {
    return el("li", null, [el("a", { href: "#" + uid + "-" + sec.id, text: sec.title })]);
  }))]);
  var tokens = el("div", { cls: "ar-tokens", role: "group", "aria-label": "tokens to follow" },
    data.labels.map(function (label, i) { return tokenButton(i, label, "ar-tok-chip"); }));
  app.appendChild(el("header", { cls: "ar-header" }, [
    el("h1", { text: data.title || "Attention, step by step" }),
    el("p", { cls: "ar-sub", text: data.subtitle ||
      "Every number below is a recorded step of attnlab explain (" + data.settings_text + ")." }),
    toc
  ]));
  app.appendChild(el("div", { cls: "ar-bar" }, [el("span", { cls: "ar-bar-label", text: "Follow a token:" }), tokens]));
  var anyMasked = Object.keys(data.steps).some(function (k) { return data.steps[k].masked; });
  var legend = el("div", { cls: "ar-legend", role: "note", "aria-label": "legend" }, [
    el("span", { cls: "ar-legend-item" }, [el("span", { cls: "ar-swatch ar-swatch-grad", style: "background:" + gradient() }),
      "low → high value (each map runs from its smallest to its largest number; its bar gives the range)"]),
    anyMasked ? el("span", { cls: "ar-legend-item" }, [el("span", { cls: "ar-swatch ar-masked" }),
      "masked: a future token the causal mask hides (weight 0)"]) : null,
    el("span", { cls: "ar-legend-item" }, [el("span", { cls: "ar-swatch ar-swatch-sel" }),
      "the row of the token you follow"]),
    el("span", { cls: "ar-legend-item ar-legend-hint",
      text: "Hover, tap or focus a cell (arrow keys move) to see how its number is made; click a token to follow its computation." })
  ]);
  app.appendChild(legend);

  data.sections.forEach(function (sec) {
    if (sec.heads.length) state.heads[sec.id] = 0;
    var box = el("section", { cls: "ar-section", "data-section": sec.id, id: uid + "-" + sec.id,
      "aria-labelledby": uid + "-" + sec.id + "-h" }, [
      el("h2", { id: uid + "-" + sec.id + "-h", text: sec.title })
    ]);
    if (sec.heads.length) {
      box.appendChild(el("div", { cls: "ar-heads", role: "group", "aria-label": "heads" }, [
        el("span", { cls: "ar-bar-label", text: "Head:" })
      ].concat(sec.heads.map(function (label, h) {
        return el("button", { type: "button", cls: "ar-head-btn", "data-head": h, text: "head " + label,
          "aria-pressed": h === 0 ? "true" : "false", onclick: function () { selectHead(sec, h); } });
      }))));
    }
    var hasFollow = sec.follow.some(function (items) { return items.length; });
    if (hasFollow) box.appendChild(el("div", { cls: "ar-follow", "aria-live": "polite" }));
    var steps = el("div", { cls: "ar-steps" });
    sec.steps.forEach(function (id) { steps.appendChild(buildStep(data.steps[id], sec)); });
    box.appendChild(steps);
    app.appendChild(box);
  });
  app.appendChild(tip);
  data.sections.forEach(function (sec) { if (sec.heads.length) selectHead(sec, 0); else renderFollow(sec); });

  // Pointer and focus: one set of listeners on the root.
  root.addEventListener("mouseover", function (ev) {
    var td = ev.target.closest && ev.target.closest("td[data-k]");
    if (td && root.contains(td)) showTip(td);
  });
  root.addEventListener("mouseout", function (ev) {
    var td = ev.target.closest && ev.target.closest("td[data-k]");
    if (td && !(ev.relatedTarget && td.contains(ev.relatedTarget))) hideTip();
  });
  root.addEventListener("focusin", function (ev) {
    if (ev.target.matches && ev.target.matches("td[data-k]")) showTip(ev.target);
  });
  root.addEventListener("focusout", function (ev) {
    if (ev.target.matches && ev.target.matches("td[data-k]")) hideTip();
  });
  root.addEventListener("click", function (ev) {
    var td = ev.target.closest && ev.target.closest("td[data-k]");
    if (td && root.contains(td)) {
      root.querySelectorAll("td[data-k][tabindex='0']").forEach(function (x) {
        if (x.closest("table") === td.closest("table")) x.tabIndex = -1;
      });
      td.tabIndex = 0;
      showTip(td);
    }
  });
  root.addEventListener("keydown", onGridKey);
  return { selectToken: selectToken };
}
