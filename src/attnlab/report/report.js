/* attnlab report: lays out recorded attention steps (data made by attnlab.report.html).
 *
 * It computes no attention: every number, label and formula comes from the data. Numbers arrive once, in
 * the compact form of attnlab/report/codec.py (each value as the integer round(v * 10^dec), zigzag varint,
 * base64) and are decoded here on first use. Small maps are tables with their numbers in the cells; large
 * ones (many tokens) are drawn on <canvas>, with zoom, pan, hover and a keyboard cursor. Hover text and a
 * followed token's rows are the library's own lines when the data carries them, else written on demand
 * from each step's template (attnlab.explain.kinds) filled with the recorded numbers.
 * Everything is scoped to `root` (one report's container), so several reports can share a page.
 */
function attnlabReport(root, data) {
  "use strict";
  var uid = root.id;
  var nTok = data.labels.length;
  var state = { token: data.query, sel: {}, filter: "map" };  // followed token; {head, layer} per section
  var timings = { ready: null, head: [], hover: [] };  // performance.now() around the handlers (benchmarks)
  root.attnlabTimings = timings;
  var TABLE_MAX = 24;  // maps with more rows or columns than this are drawn on a canvas
  var LIMIT = 16;  // longer vectors are written [first 3, …, last] (n numbers)

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

  // ---------------------------------------------------------------- decoding (codec.py's twin)
  function bytesOf(text) {
    var bin = atob(text), n = bin.length, out = new Uint8Array(n);
    for (var i = 0; i < n; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  Object.keys(data.steps).forEach(function (id) {  // shared parts, sent once (see html.py's _share)
    var s = data.steps[id];
    s.labels = s.labels.map(function (l) { return l === "@labels" ? data.labels : l; });
    if (s.values.same) s.values = data.steps[s.values.same].values;
  });
  function vals(step) {  // Float64Array: q (modes "q", "u16") or the values themselves (mode "f64")
    var blob = step.values;
    if (blob.decoded) return blob.decoded;
    var n = size(step.shape), out;
    if (blob.fill !== undefined) {  // masked cells left out of the data: they all hold blob.fill
      var kept = 0;
      for (var m = 0; m < n; m++) if (!masked(step, m)) kept++;
      var specials = { "-inf": -Infinity, "inf": Infinity, "nan": NaN };
      var inner = decodeBlob(blob, kept), fill = blob.fill in specials ? specials[blob.fill] : +blob.fill;
      if (blob.mode !== "f64" && isFinite(fill)) fill = Math.round(fill * Math.pow(10, blob.dec));
      out = new Float64Array(n);
      for (var a = 0, b = 0; a < n; a++) out[a] = masked(step, a) ? fill : inner[b++];
      blob.decoded = out;
      return out;
    }
    out = decodeBlob(blob, n);
    blob.decoded = out;
    return out;
  }
  function decodeBlob(blob, n) {
    var bytes = bytesOf(blob.data), out;
    if (blob.mode === "f64") {
      out = new Float64Array(bytes.buffer, 0, n);
    } else if (blob.mode === "u16") {
      out = new Float64Array(n);
      for (var c = 0; c < n; c++) {
        var code = bytes[2 * c] | bytes[2 * c + 1] << 8;
        out[c] = code < 3 ? (code === 0 ? NaN : (code === 1 ? Infinity : -Infinity)) : code - 3 + blob.low;
      }
    } else {
      out = new Float64Array(n);
      var k = 0, value = 0, mul = 1;
      for (var i = 0; i < bytes.length; i++) {
        var b = bytes[i];
        value += (b & 127) * mul;
        if (b & 128) { mul *= 128; continue; }
        if (value < 3) out[k++] = value === 0 ? NaN : (value === 1 ? Infinity : -Infinity);
        else { var z = value - 3; out[k++] = z % 2 === 0 ? z / 2 : -(z + 1) / 2; }
        value = 0; mul = 1;
      }
    }
    return out;
  }
  function unit(step) { return step.values.mode !== "f64" ? Math.pow(10, step.values.dec) : 1; }
  function num(step, k) { return vals(step)[k] / unit(step); }
  function pad(n, w) { var s = String(n); while (s.length < w) s = "0" + s; return s; }
  function text(step, k, whole) {  // exactly as attnlab explain writes it (fixed decimals or whole numbers)
    var q = vals(step)[k], dec = step.values.dec;
    if (q !== q) return "nan";
    if (q === Infinity) return "inf";
    if (q === -Infinity) return "-inf";
    if (step.values.mode === "f64") {
      var t = whole ? String(Math.round(q)) : q.toFixed(dec);
      return /^-[0.]*$/.test(t) ? t.slice(1) : t;
    }
    if (dec === 0 || whole) { var r = Math.round(q / unit(step)); return r === 0 ? "0" : String(r); }
    var a = Math.abs(q), ip = Math.floor(a / 10000), s = ip + "." + pad(a - ip * 10000, 4);
    return q < 0 ? "-" + s : s;
  }
  var maskBits = {};
  function masked(step, k) {
    if (!step.masked) return false;
    var bits = maskBits[step.id] || (maskBits[step.id] = bytesOf(step.masked));
    return (bits[k >> 3] >> (7 - (k & 7))) & 1;
  }
  // Why a masked cell is hidden: a key of data.mask_words ("future", "window", "cache"); a step's
  // mask_reasons is [[reason, bits of its cells, or null for every masked cell], ...].
  var MASK_WORDS = data.mask_words || { future: "a future token the causal mask hides" };
  function maskReason(step, k) {
    var rs = step.mask_reasons;
    if (!rs || !rs.length) return "future";
    for (var i = 0; i < rs.length; i++) {
      if (!rs[i][1]) return rs[i][0];
      var key = step.id + "#" + i;
      var bits = maskBits[key] || (maskBits[key] = bytesOf(rs[i][1]));
      if ((bits[k >> 3] >> (7 - (k & 7))) & 1) return rs[i][0];
    }
    return rs[0][0];
  }
  function maskWords(reason) { return MASK_WORDS[reason] || MASK_WORDS.future; }
  function trimmed(v) {  // numbers inside a written-out formula: trailing zeros dropped
    if (v !== v) return "nan";
    if (!isFinite(v)) return v < 0 ? "-inf" : "inf";
    if (Math.abs(v - Math.round(v)) < 1e-9) return String(Math.round(v)) === "-0" ? "0" : String(Math.round(v));
    var t = v.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
    return t === "-0" ? "0" : t;
  }
  function factor(t) { return t.charAt(0) === "-" ? "(" + t + ")" : t; }

  // ---------------------------------------------------------------- colours
  var rgb = data.colors.map(function (h) {
    return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)];
  });
  function colorIndex(step, v) {
    var lo = step.vmin, hi = step.vmax;
    var t = hi > lo ? (v - lo) / (hi - lo) : 1;
    t = Math.max(0, Math.min(1, t));
    return Math.round(t * (data.colors.length - 1));
  }
  function colorOf(step, v) { return data.colors[colorIndex(step, v)]; }
  function inkOn(hex) {
    var r = parseInt(hex.slice(1, 3), 16) / 255, g = parseInt(hex.slice(3, 5), 16) / 255,
      b = parseInt(hex.slice(5, 7), 16) / 255;
    return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 ? "#111" : "#fff";
  }
  function gradient() {
    var stops = data.colors.filter(function (_, i) { return i % 8 === 0 || i === data.colors.length - 1; });
    return "linear-gradient(to right, " + stops.join(", ") + ")";
  }

  // ---------------------------------------------------------------- shapes and names
  function size(shape) { return shape.reduce(function (a, b) { return a * b; }, 1); }
  function leadIndices(step) {  // every index of the axes before the last two: one map each
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
  function dims(step) { return [step.shape[step.shape.length - 2], step.shape[step.shape.length - 1]]; }
  function panelName(step, lead) {
    return lead.map(function (i, a) { return step.axes[a] + " " + step.labels[a][i]; }).join(", ");
  }
  function isTokenAxis(step, axis) {
    var name = step.axes[axis];
    return (name === "query" || name === "token") && step.labels[axis].length === nTok;
  }
  function rowTokenOf(step, r) {  // the token a map's row belongs to, or -1
    var rAxis = step.shape.length - 2;
    if (isTokenAxis(step, rAxis)) return r;
    return step.axes[rAxis] === "query" && step.shape[rAxis] === 1 ? data.query : -1;
  }
  function prefix(step, index, inner) {
    var parts = [];
    for (var a = 0; a < index.length - inner; a++) parts.push(step.axes[a] + " " + step.labels[a][index[a]]);
    return parts.length ? parts.join(", ") + ": " : "";
  }
  function cellName(step, index) {  // as attnlab.explain.cells.cell_name
    var n = index.length, sym = step.symbol, col = step.labels[n - 1][index[n - 1]];
    var q = data.labels[data.query];
    if (step.one_row) {
      if (step.axes[n - 1] === "dim") return sym + "_" + q + "[" + col + "]";
      if (step.axes[n - 1] === "key") return sym + "(" + q + ", " + col + ")";
      return sym + "[" + col + "]";
    }
    var row = step.labels[n - 2][index[n - 2]], pre = prefix(step, index, 2);
    var two = step.axes[n - 2] + "," + step.axes[n - 1];
    if (two === "query,key") return pre + sym + "(" + row + ", " + col + ")";
    if (two === "token,dim") return pre + sym + "_" + row + "[" + col + "]";
    return pre + sym + "[" + row + ", " + col + "]";
  }
  function rowName(step, index) {  // index: every axis but the last (as cells.row_name)
    var n = index.length, sym = step.symbol, q = data.labels[data.query];
    if (step.one_row) return step.axes[n] === "dim" ? sym + "_" + q : sym + "(" + q + ", ·)";
    var row = step.labels[n - 1][index[n - 1]], pre = prefix(step, index, 1);
    var two = step.axes[n - 1] + "," + step.axes[n];
    if (two === "query,key") return pre + sym + "(" + row + ", ·)";
    if (two === "token,dim") return pre + sym + "_" + row;
    return pre + sym + "[" + row + ", ·]";
  }
  function vector(step, k0, n, limit) {  // n numbers from flat index k0, whole numbers if all are whole
    var q = vals(step), u = unit(step), whole = step.values.mode !== "f64" && step.values.dec > 0;
    for (var i = 0; i < n && whole; i++) whole = isFinite(q[k0 + i]) && q[k0 + i] % u === 0;
    var out = [];
    var idx = n > limit ? [0, 1, 2, n - 1] : null;
    (idx || Array.apply(null, Array(n)).map(function (_, i) { return i; })).forEach(function (i, a) {
      if (idx && a === 3) out.push("…");
      out.push(text(step, k0 + i, whole));
    });
    return "[" + out.join(", ") + "]" + (idx ? " (" + n + " numbers)" : "");
  }
  function largest(step, k0, n, colLabels, count) {  // "mat 0.5123, the 0.1202, ..." of one row
    var order = [];
    for (var i = 0; i < n; i++) if (!masked(step, k0 + i) && isFinite(vals(step)[k0 + i])) order.push(i);
    order.sort(function (a, b) { return vals(step)[k0 + b] - vals(step)[k0 + a]; });
    return order.slice(0, count).map(function (i) { return colLabels[i] + " " + text(step, k0 + i); }).join(", ");
  }

  // ---------------------------------------------------------------- "how this number is made"
  // Each step carries its hover template, written by the library's one table of step kinds
  // (attnlab.explain.kinds; its render_template is this code's Python twin): cases [test, lines]. The first
  // case whose test holds for the cell is written, its {placeholders} filled from the recorded numbers.
  // Nothing here knows what a step does: the words and the choice of numbers come with the data.
  var PLACEHOLDER = /\{\{|\}\}|\{(?:([abc])\.)?([a-z]+)\}/g;
  function sumOf(values) { return values.reduce(function (a, b) { return a + b; }, 0); }
  function expOf(v) { return v === -Infinity ? 0 : Math.exp(v); }
  function signedSum(texts) {
    return texts.map(function (t, x) {
      return x === 0 ? t : (t.charAt(0) === "-" ? " − " + t.slice(1) : " + " + t);
    }).join("");
  }
  function shortVector(step, k0, n) {  // trimmed numbers, longer than 8 as [first 3, …, last] (n numbers)
    var out = [];
    for (var x = 0; x < n; x++) out.push(trimmed(num(step, k0 + x)));
    if (n > 8) return "[" + out.slice(0, 3).concat(["…", out[n - 1]]).join(", ") + "] (" + n + " numbers)";
    return "[" + out.join(", ") + "]";
  }
  function templateLines(step, index) {
    var n = index.length, lead = index.slice(0, n - 2), j = index[n - 1];
    var i = step.one_row ? data.query : index[n - 2];
    var ops = (step.operands || []).map(function (o) { return data.steps[o]; });
    function source(name) { return name ? ops["abc".indexOf(name)] : step; }
    function at(s) { return flat(s, index); }
    function cols(s) { return s.shape[s.shape.length - 1]; }
    function rowOf(s) {  // the numbers of s's row that holds this cell
      var k0 = at(s) - j, out = [];
      for (var x = 0; x < cols(s); x++) out.push(num(s, k0 + x));
      return out;
    }
    function rowAt(s, r) { return s.one_row ? [0] : lead.slice(0, s.shape.length - 2).concat([r]); }
    function test(atom) {
      var negate = atom.charAt(0) === "!", name = negate ? atom.slice(1) : atom, dot = name.lastIndexOf(".");
      var s = source(dot < 0 ? "" : name.slice(0, dot)), hit;
      name = name.slice(dot + 1);
      if (name === "inf") hit = num(s, at(s)) === -Infinity;
      else if (name === "zero") hit = vals(s)[at(s)] === 0;
      else if (name === "after") hit = j > i;
      else if (name === "big") {
        var finite = rowOf(s).filter(function (v) { return isFinite(v); });
        hit = finite.length > 0 && Math.max.apply(null, finite) > 80;
      } else hit = cols(s) <= +name.split("<=")[1];
      return hit !== negate;
    }
    function terms() {  // Σ_j a(i, j) × b(j, col), term by term
      var a = ops[0], b = ops[1], texts = [];
      var k0 = a.one_row ? 0 : flat(a, lead.slice(0, a.shape.length - 2).concat([i, 0]));
      for (var x = 0; x < cols(a); x++) {
        var bk = flat(b, lead.slice(0, b.shape.length - 2).concat([x, j]));
        texts.push(trimmed(num(a, k0 + x)) + "×" + factor(trimmed(num(b, bk))));
      }
      return signedSum(texts);
    }
    var fields = {
      cell: function (s) { return cellName(s, index); },
      text: function (s) { return text(s, at(s)); },
      num: function (s) { return trimmed(num(s, at(s))); },
      exp: function (s) { return trimmed(expOf(num(s, at(s)))); },
      q: function () { return step.one_row ? data.labels[data.query] : step.labels[n - 2][i]; },
      k: function () { return step.labels[n - 1][j]; },
      qpos: function () { return String(i + 1); },
      kpos: function () { return String(j + 1); },
      rowq: function (s) { return rowName(s, rowAt(s, i)); },
      rowk: function (s) { return rowName(s, rowAt(s, j)); },
      vecq: function (s) { return shortVector(s, flat(s, rowAt(s, i).concat([0])), cols(s)); },
      veck: function (s) { return shortVector(s, flat(s, rowAt(s, j).concat([0])), cols(s)); },
      sum: function (s) { return trimmed(sumOf(rowOf(s))); },
      expsum: function (s) { return trimmed(sumOf(rowOf(s).map(expOf))); },
      exps: function (s) {
        if (cols(s) > 8) return "Σ of " + cols(s) + " exps";
        return rowOf(s).map(function (v) { return "exp(" + trimmed(v) + ")"; }).join(" + ");
      },
      terms: terms
    };
    function fill(match, src, name) {
      if (match === "{{" || match === "}}") return match.charAt(0);
      return fields[name](source(src));
    }
    var cases = step.template || [];
    for (var c = 0; c < cases.length; c++) {
      var atoms = cases[c][0].split("&").filter(function (x) { return x; });
      if (atoms.every(test)) return cases[c][1].map(function (line) { return line.replace(PLACEHOLDER, fill); });
    }
    return [cellName(step, index) + " = " + text(step, flat(step, index))];
  }
  function hoverLines(step, index) {
    var k = flat(step, index), chain = [], s = step, seen = 0;
    while (s && seen < 8) { chain.unshift(s); s = s.chain ? data.steps[s.chain] : null; seen++; }
    var lines = [];
    chain.forEach(function (c) {
      if (data.hover && c.hover) lines = lines.concat(c.hover[k]);
      else lines = lines.concat(templateLines(c, index));
    });
    var n = index.length, cols = step.shape[n - 1];
    if (step.map && cols > 8 && !step.one_row) {
      lines.push("  largest in this row: " + largest(step, k - index[n - 1], cols, step.labels[n - 1], 3));
    }
    return lines;
  }

  // ---------------------------------------------------------------- tooltip (hover / focus / tap)
  var tip = el("div", { cls: "ar-tooltip", role: "tooltip", id: uid + "-tip", hidden: true });
  function cellLabel(step, lead, r, c) {
    var caption = panelName(step, lead), n = step.shape.length;
    return (caption ? caption + ": " : "") + step.symbol + "(" + step.labels[n - 2][r] + ", " +
      step.labels[n - 1][c] + ") = " + text(step, flat(step, lead.concat([r, c])));
  }
  function showTip(step, lead, r, c, rect) {
    var t0 = performance.now();
    var k = flat(step, lead.concat([r, c]));
    tip.textContent = "";
    tip.appendChild(el("div", { cls: "ar-tip-title", text: cellLabel(step, lead, r, c) }));
    if (masked(step, k)) {
      tip.appendChild(el("div", { cls: "ar-tip-note", text: "masked: " + maskWords(maskReason(step, k)) }));
    }
    hoverLines(step, lead.concat([r, c])).forEach(function (line) {
      tip.appendChild(el("div", { cls: "ar-tip-line", text: line }));
    });
    tip.hidden = false;
    var box = root.getBoundingClientRect();
    var width = Math.min(tip.offsetWidth, box.width - 8);
    var left = rect.left - box.left + rect.width / 2 - width / 2;
    left = Math.max(4, Math.min(left, box.width - width - 4));
    var top = rect.bottom - box.top + 6;
    var below = window.innerHeight - rect.bottom;
    if (below < tip.offsetHeight + 12 && rect.top > tip.offsetHeight + 12) top = rect.top - box.top - tip.offsetHeight - 6;
    tip.style.left = left + "px";
    tip.style.top = top + "px";
    timings.hover.push(performance.now() - t0);
  }
  function hideTip() { tip.hidden = true; }

  // ---------------------------------------------------------------- token selection
  var views = [];  // every canvas map and overview: redrawn when the token or the head changes
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
    root.querySelectorAll(".ar-tok[aria-pressed='true']").forEach(function (b) { b.setAttribute("aria-pressed", "false"); });
    root.querySelectorAll('.ar-tok[data-token="' + i + '"]').forEach(function (b) { b.setAttribute("aria-pressed", "true"); });
    root.querySelectorAll("tr.ar-sel").forEach(function (tr) { tr.classList.remove("ar-sel"); });
    root.querySelectorAll('tr[data-token="' + i + '"]').forEach(function (tr) { tr.classList.add("ar-sel"); });
    root.querySelectorAll(".ar-filter-token").forEach(function (s) { s.textContent = data.labels[i]; });
    views.forEach(function (v) { v.redraw("token"); });
    data.sections.forEach(renderFollow);
  }

  // ---------------------------------------------------------------- heads and layers
  function currentLead(step, sec) {
    var sel = state.sel[sec.id] || { head: 0, layer: 0 };
    return step.shape.slice(0, -2).map(function (_, a) {
      if (a === step.head_axis) return sel.head;
      if (step.axes[a] === "layer") return sel.layer;
      return 0;
    });
  }
  function select(sec, change) {
    var t0 = performance.now();
    var sel = state.sel[sec.id];
    if (change.head !== undefined) sel.head = change.head;
    if (change.layer !== undefined) sel.layer = change.layer;
    var box = root.querySelector('[data-section="' + sec.id + '"]');
    box.querySelectorAll(".ar-head-btn").forEach(function (b) {
      b.setAttribute("aria-pressed", +b.getAttribute("data-head") === sel.head ? "true" : "false");
    });
    box.querySelectorAll(".ar-layer-btn").forEach(function (b) {
      b.setAttribute("aria-pressed", +b.getAttribute("data-layer") === sel.layer ? "true" : "false");
    });
    box.querySelectorAll(".ar-panel[data-head]").forEach(function (p) {
      var layer = p.getAttribute("data-layer");
      p.hidden = +p.getAttribute("data-head") !== sel.head || (layer !== null && +layer !== sel.layer);
      if (!p.hidden) p.attnlabBuild();
    });
    box.querySelectorAll("tr[data-token]").forEach(function (tr) {
      tr.classList.toggle("ar-sel", +tr.getAttribute("data-token") === state.token);
    });
    box.querySelectorAll(".ar-mini[data-head]").forEach(function (m) {
      var layer = m.getAttribute("data-layer");
      var on = +m.getAttribute("data-head") === sel.head && (layer === null || +layer === sel.layer);
      m.classList.toggle("ar-mini-on", on);
      m.setAttribute("aria-pressed", on ? "true" : "false");
      m.tabIndex = on ? 0 : -1;
    });
    views.forEach(function (v) { if (v.sec === sec) v.redraw("lead"); });
    renderFollow(sec);
    timings.head.push(performance.now() - t0);
  }

  // ---------------------------------------------------------------- small maps: tables with numbers
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
    var rc = dims(step), rows = rc[0], cols = rc[1];
    var rAxis = step.shape.length - 2, cAxis = rAxis + 1;
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
      var tokenIndex = rowTokenOf(step, i);
      var th = el("th", { scope: "row" }, [
        tokenIndex >= 0 ? tokenButton(tokenIndex, rowLabel, "ar-tok-row") : rowLabel
      ]);
      var tr = el("tr", tokenIndex >= 0 ? { "data-token": tokenIndex } : null, [th]);
      if (tokenIndex === state.token) tr.classList.add("ar-sel");
      for (var c = 0; c < cols; c++) {
        var k = flat(step, lead.concat([i, c]));
        var td = el("td", { text: text(step, k) });
        if (step.map) {
          var v = num(step, k);
          td.setAttribute("role", "gridcell");
          td.setAttribute("data-step", step.id);
          td.setAttribute("data-k", k);
          td.setAttribute("data-r", i);
          td.setAttribute("data-c", c);
          td.setAttribute("aria-label", cellLabel(step, lead, i, c) + (masked(step, k) ? " (masked)" : ""));
          td.setAttribute("aria-describedby", uid + "-tip");
          td.tabIndex = first ? 0 : -1;
          first = false;
          if (masked(step, k) || !isFinite(v)) {
            td.className = masked(step, k) ? "ar-masked ar-masked-" + maskReason(step, k) : "ar-masked";
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
    table.attnlabLead = lead;
    return table;
  }
  function tdTip(td) {
    var step = data.steps[td.getAttribute("data-step")], table = td.closest("table");
    showTip(step, table.attnlabLead, +td.getAttribute("data-r"), +td.getAttribute("data-c"), td.getBoundingClientRect());
  }

  // ---------------------------------------------------------------- work done when a part is scrolled to
  var waiting = [];
  var observer = typeof IntersectionObserver === "function" ? new IntersectionObserver(function (entries) {
    entries.forEach(function (e) {
      if (!e.isIntersecting) return;
      observer.unobserve(e.target);
      waiting = waiting.filter(function (w) {
        if (w.node !== e.target) return true;
        w.then();
        return false;
      });
    });
  }, { rootMargin: "400px 0px" }) : null;
  function whenShown(node, then) {
    if (!observer) { then(); return; }
    waiting.push({ node: node, then: then });
    observer.observe(node);
  }

  // ---------------------------------------------------------------- pictures of maps (canvas)
  var scratch = document.createElement("canvas");
  var lut = new Uint32Array(rgb.length + 1);  // colours as little-endian RGBA words; the last one: masked grey
  rgb.forEach(function (c, i) { lut[i] = (255 << 24 | c[2] << 16 | c[1] << 8 | c[0]) >>> 0; });
  lut[rgb.length] = (255 << 24 | 217 << 16 | 217 << 8 | 217) >>> 0;
  function mapImage(step, lead, filter, token) {  // the map (or one token's row / column) as pixels
    var rc = dims(step), rows = rc[0], cols = rc[1];
    var k0 = flat(step, lead.concat([0, 0])), w = cols, h = rows, stride = 1, start = k0;
    if (filter === "row") { h = 1; start = k0 + token * cols; }
    else if (filter === "col") { w = rows; h = 1; start = k0 + token; stride = cols; }
    scratch.width = w; scratch.height = h;
    var ctx = scratch.getContext("2d"), img = ctx.createImageData(w, h);
    var px = new Uint32Array(img.data.buffer);
    var q = vals(step), u = unit(step), last = rgb.length - 1, grey = rgb.length;
    var lo = step.vmin * u, span = (step.vmax - step.vmin) * u, f = span > 0 ? last / span : 0;
    var hasMask = !!step.masked, n = w * h;
    for (var x = 0; x < n; x++) {
      var k = start + x * stride, v = q[k];
      if (v !== v || v === Infinity || v === -Infinity || (hasMask && masked(step, k))) { px[x] = lut[grey]; continue; }
      var t = f ? Math.round((v - lo) * f) : last;
      px[x] = lut[t < 0 ? 0 : t > last ? last : t];
    }
    ctx.putImageData(img, 0, 0);
    return scratch;
  }

  function canvasView(step, sec, caption) {
    var rc = dims(step), rows = rc[0], cols = rc[1];
    var rAxis = step.shape.length - 2, cAxis = rAxis + 1;
    var maxCell = Math.max(1, Math.floor(4000 / Math.max(rows, cols)));
    var view = { sec: sec, cell: 0, cursor: [Math.min(rowOrZero(), rows - 1), 0], lead: currentLead(step, sec) };
    function rowOrZero() { return isTokenAxis(step, rAxis) ? Math.max(0, state.token) : 0; }
    var canvas = el("canvas", {
      cls: "ar-canvas", tabindex: "0", role: "img", "aria-roledescription": "heatmap",
      "aria-describedby": uid + "-tip", "data-step": step.id
    });
    var scroll = el("div", { cls: "ar-canvas-scroll" }, [canvas]);
    var zoomLabel = el("span", { cls: "ar-zoom-label" });
    function zoomBy(f) {
      var next = f === 0 ? fitCell() : Math.max(1, Math.min(maxCell, f > 1 ? Math.max(view.cell + 1, Math.round(view.cell * f))
        : Math.min(view.cell - 1, Math.round(view.cell * f))));
      view.cell = Math.max(1, next);
      draw();
    }
    var zoom = el("div", { cls: "ar-zoom", role: "group", "aria-label": "zoom" }, [
      el("button", { type: "button", cls: "ar-zoom-btn", text: "−", "aria-label": "zoom out", onclick: function () { zoomBy(1 / 1.5); } }),
      el("button", { type: "button", cls: "ar-zoom-btn", text: "+", "aria-label": "zoom in", onclick: function () { zoomBy(1.5); } }),
      el("button", { type: "button", cls: "ar-zoom-btn", text: "fit", "aria-label": "fit the width", onclick: function () { zoomBy(0); } }),
      zoomLabel,
      el("span", { cls: "ar-zoom-hint", text: "rows: queries, columns: keys · hover or use the arrow keys · drag to pan" })
    ]);
    var labelFont = "11px system-ui, sans-serif";
    function labelWidth() {
      var ctx = canvas.getContext("2d"), widest = 0;
      ctx.font = labelFont;
      var all = step.labels[rAxis].concat(step.labels[cAxis]);
      for (var i = 0; i < all.length; i += Math.max(1, Math.floor(all.length / 400))) {
        widest = Math.max(widest, ctx.measureText(all[i]).width);
      }
      return Math.min(96, Math.ceil(widest) + 8);
    }
    var margin = 0;
    function fitCell() {
      var width = (scroll.clientWidth || 800) - margin - 4;
      return Math.max(1, Math.min(maxCell, 28, Math.floor(width / cols)));
    }
    function every(cell) { return Math.max(1, Math.ceil(13 / cell)); }
    function draw() {
      if (!margin) margin = labelWidth();
      if (!view.cell) view.cell = fitCell();
      var cs = view.cell, w = margin + cols * cs + 2, h = margin + rows * cs + 2;
      var dpr = window.devicePixelRatio || 1;
      if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
        canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
        canvas.style.width = w + "px"; canvas.style.height = h + "px";
      }
      var ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(mapImage(step, view.lead), 0, 0, cols, rows, margin, margin, cols * cs, rows * cs);
      if (cs >= 8) {  // cell borders when cells are large enough to see them
        ctx.strokeStyle = "rgba(255,255,255,0.9)"; ctx.lineWidth = 1; ctx.beginPath();
        for (var x = 0; x <= cols; x++) { ctx.moveTo(margin + x * cs + 0.5, margin); ctx.lineTo(margin + x * cs + 0.5, margin + rows * cs); }
        for (var y = 0; y <= rows; y++) { ctx.moveTo(margin, margin + y * cs + 0.5); ctx.lineTo(margin + cols * cs, margin + y * cs + 0.5); }
        ctx.stroke();
      }
      // token labels: every one when they fit, else every n-th (the followed token always)
      ctx.font = labelFont; ctx.fillStyle = "#1d2330"; ctx.textBaseline = "middle";
      var n = every(cs);
      ctx.textAlign = "right";
      for (var r = 0; r < rows; r++) {
        var rowTok = rowTokenOf(step, r);
        if (rowTok !== state.token && (r % n || (state.token >= 0 && Math.abs(r - state.token) < n && rowTok >= 0))) continue;
        ctx.fillStyle = rowTok === state.token ? "#d6336c" : "#1d2330";
        ctx.fillText(step.labels[rAxis][r], margin - 4, margin + (r + 0.5) * cs, margin - 6);
      }
      ctx.save(); ctx.translate(margin, margin - 4); ctx.rotate(-Math.PI / 2); ctx.textAlign = "left";
      for (var c = 0; c < cols; c++) {
        var isTok = cols === nTok && c === state.token;
        if (!isTok && (c % n || (cols === nTok && state.token >= 0 && Math.abs(c - state.token) < n))) continue;
        ctx.fillStyle = isTok ? "#d6336c" : "#1d2330";
        ctx.fillText(step.labels[cAxis][c], 0, (c + 0.5) * cs, margin - 6);
      }
      ctx.restore();
      // the followed token's row (and its column with the column filter), the keyboard cursor
      ctx.lineWidth = 2;
      var tr = -1;
      for (var i = 0; i < rows; i++) if (rowTokenOf(step, i) === state.token) { tr = i; break; }
      if (tr >= 0) { ctx.strokeStyle = "#d6336c"; ctx.strokeRect(margin - 1, margin + tr * cs - 1, cols * cs + 2, cs + 2); }
      if (state.filter === "col" && cols === nTok && state.token >= 0) {
        ctx.strokeStyle = "#d6336c"; ctx.setLineDash([4, 3]);
        ctx.strokeRect(margin + state.token * cs - 1, margin - 1, cs + 2, rows * cs + 2); ctx.setLineDash([]);
      }
      if (view.focused) {
        ctx.strokeStyle = "#1c7ed6";
        ctx.strokeRect(margin + view.cursor[1] * cs - 1, margin + view.cursor[0] * cs - 1, cs + 2, cs + 2);
      }
      zoomLabel.textContent = cs + " px per cell";
      canvas.setAttribute("data-cell", cs);
      canvas.setAttribute("data-margin", margin);
      canvas.setAttribute("aria-label", cellLabel(step, view.lead, view.cursor[0], view.cursor[1]) +
        " (" + (caption || step.title) + ": " + rows + " × " + cols + "; arrow keys move, Enter follows the row's token)");
    }
    function cellAt(ev) {
      var box = canvas.getBoundingClientRect(), cs = view.cell;
      var c = Math.floor((ev.clientX - box.left - margin) / cs), r = Math.floor((ev.clientY - box.top - margin) / cs);
      return { r: r, c: c, inside: r >= 0 && r < rows && c >= 0 && c < cols, box: box };
    }
    function cellRect(r, c) {
      var box = canvas.getBoundingClientRect(), cs = view.cell;
      var left = box.left + margin + c * cs, top = box.top + margin + r * cs;
      return { left: left, top: top, width: cs, height: cs, bottom: top + cs, right: left + cs };
    }
    var drag = null;
    canvas.addEventListener("mousemove", function (ev) {
      if (drag) {
        scroll.scrollLeft = drag.x - (ev.clientX - drag.cx); scroll.scrollTop = drag.y - (ev.clientY - drag.cy);
        drag.moved = true;
        return;
      }
      var at = cellAt(ev);
      if (at.inside) showTip(step, view.lead, at.r, at.c, cellRect(at.r, at.c)); else hideTip();
    });
    canvas.addEventListener("mouseleave", function () { hideTip(); drag = null; });
    canvas.addEventListener("mousedown", function (ev) {
      drag = { cx: ev.clientX, cy: ev.clientY, x: scroll.scrollLeft, y: scroll.scrollTop, moved: false };
    });
    canvas.addEventListener("mouseup", function (ev) {
      var moved = drag && drag.moved;
      drag = null;
      if (moved) return;
      var at = cellAt(ev);
      if (at.inside) { view.cursor = [at.r, at.c]; draw(); showTip(step, view.lead, at.r, at.c, cellRect(at.r, at.c)); }
      else if (at.r >= 0 && at.r < rows && ev.clientX - at.box.left < margin && rowTokenOf(step, at.r) >= 0) {
        selectToken(rowTokenOf(step, at.r));
      }
    });
    canvas.addEventListener("focus", function () {
      view.focused = true; draw();
      showTip(step, view.lead, view.cursor[0], view.cursor[1], cellRect(view.cursor[0], view.cursor[1]));
    });
    canvas.addEventListener("blur", function () { view.focused = false; draw(); hideTip(); });
    canvas.addEventListener("keydown", function (ev) {
      var moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1],
        PageUp: [-10, 0], PageDown: [10, 0], Home: [0, -cols], End: [0, cols] };
      if (ev.key === "Escape") { hideTip(); return; }
      if (ev.key === "Enter" || ev.key === " ") {
        var t = rowTokenOf(step, view.cursor[0]);
        if (t >= 0) selectToken(t);
        ev.preventDefault();
        return;
      }
      if (ev.key === "+" || ev.key === "=") { zoomBy(1.5); ev.preventDefault(); return; }
      if (ev.key === "-") { zoomBy(1 / 1.5); ev.preventDefault(); return; }
      var m = moves[ev.key];
      if (!m) return;
      view.cursor = [Math.max(0, Math.min(rows - 1, view.cursor[0] + m[0])), Math.max(0, Math.min(cols - 1, view.cursor[1] + m[1]))];
      draw();
      var cs = view.cell, x = margin + view.cursor[1] * cs, y = margin + view.cursor[0] * cs;
      if (x < scroll.scrollLeft || x + cs > scroll.scrollLeft + scroll.clientWidth) scroll.scrollLeft = x - scroll.clientWidth / 2;
      if (y < scroll.scrollTop || y + cs > scroll.scrollTop + scroll.clientHeight) scroll.scrollTop = y - scroll.clientHeight / 2;
      showTip(step, view.lead, view.cursor[0], view.cursor[1], cellRect(view.cursor[0], view.cursor[1]));
      ev.preventDefault();
    });
    var captionNode = el("figcaption", { text: caption });
    view.redraw = function (why) {
      view.lead = currentLead(step, sec);
      captionNode.textContent = panelName(step, view.lead);
      if (why === "token" && isTokenAxis(step, rAxis) && state.token >= 0) view.cursor = [state.token, view.cursor[1]];
      if (view.live) draw();
    };
    view.node = el("figure", { cls: "ar-panel ar-panel-canvas", "data-step": step.id }, [captionNode, zoom, scroll, colorBar(step)]);
    view.start = function () {  // sized now (no jump when it is drawn), drawn when scrolled to
      margin = labelWidth();
      var cs = fitCell();
      canvas.style.width = (margin + cols * cs + 2) + "px";
      canvas.style.height = (margin + rows * cs + 2) + "px";
      whenShown(view.node, function () { view.live = true; view.cell = 0; draw(); canvas.setAttribute("data-drawn", "1"); });
    };
    views.push(view);
    return view;
  }

  // ---------------------------------------------------------------- overview: every head (and layer)
  function overview(step, sec) {
    var leads = leadIndices(step), twoAxes = leads[0].length === 2, rc = dims(step);
    var thumb = twoAxes ? (rc[1] > TABLE_MAX ? 64 : 56) : 84;
    var rAxis = step.shape.length - 2;
    var filterable = step.map && rc[0] === nTok && rc[1] === nTok;
    var grid = el("div", { cls: "ar-multiples" + (twoAxes ? " ar-multiples-grid" : ""), role: "group",
      "aria-label": twoAxes ? "every layer (rows) and head (columns)" : "all heads side by side" });
    if (twoAxes) grid.style.gridTemplateColumns = "auto repeat(" + step.shape[1] + ", max-content)";
    var minis = [];
    if (twoAxes) {
      grid.appendChild(el("span", { cls: "ar-grid-corner", text: "layer ↓ head →" }));
      step.labels[1].forEach(function (h) { grid.appendChild(el("span", { cls: "ar-grid-head", text: h })); });
    }
    leads.forEach(function (lead) {
      if (twoAxes && lead[1] === 0) grid.appendChild(el("span", { cls: "ar-grid-layer", text: step.labels[0][lead[0]] }));
      var canvas = el("canvas", { cls: "ar-mini-canvas", width: thumb, height: thumb, "aria-hidden": "true" });
      var h = lead[step.head_axis];
      var attrs = { type: "button", cls: "ar-mini", "data-head": h, "aria-pressed": "false", tabindex: "-1",
        "aria-label": "show " + panelName(step, lead),
        onclick: function () { select(sec, twoAxes ? { layer: lead[0], head: h } : { head: h }); } };
      if (twoAxes) attrs["data-layer"] = lead[0];
      var button = el("button", attrs, [twoAxes ? null : el("span", { cls: "ar-mini-title", text: panelName(step, lead) }), canvas]);
      minis.push({ canvas: canvas, lead: lead, button: button });
      grid.appendChild(button);
    });
    grid.addEventListener("keydown", function (ev) {  // arrow keys move between the small maps
      var at = minis.findIndex(function (m) { return m.button === document.activeElement; });
      if (at < 0) return;
      var across = twoAxes ? step.shape[1] : minis.length;
      var moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -across, ArrowDown: across };
      if (!(ev.key in moves)) return;
      var next = minis[at + moves[ev.key]];
      if (next) { next.button.click(); next.button.focus(); }
      ev.preventDefault();
    });
    var view = { sec: sec, node: null };
    var pending = 0;
    view.start = function () { whenShown(grid, function () { view.live = true; view.redraw("token"); }); };
    view.redraw = function (why) {
      if (why === "lead" || !view.live) return;
      var mode = filterable ? state.filter : "map", token = state.token, ticket = ++pending;
      var at = 0, batch = minis.length > 16 ? 12 : minis.length;
      function some() {  // a few small maps per frame: the page answers while they are drawn
        if (ticket !== pending) return;
        minis.slice(at, at + batch).forEach(function (m) { drawMini(m, mode, token); });
        at += batch;
        if (at < minis.length) requestAnimationFrame(some);
      }
      if (batch === minis.length) some(); else requestAnimationFrame(some);
    };
    function drawMini(m, mode, token) {
      var ctx = m.canvas.getContext("2d"), t = Math.max(0, token);
      var rows = mode === "map" ? rc[0] : 1, cols = mode === "map" ? rc[1] : rc[0];
      var img = mapImage(step, m.lead, mode === "map" ? null : mode, t);
      var high = mode === "map" ? thumb : Math.max(10, Math.round(thumb / 5));
      if (m.canvas.height !== high) m.canvas.height = high;
      ctx.imageSmoothingEnabled = rows > thumb || cols > thumb;
      ctx.clearRect(0, 0, thumb, high);
      ctx.drawImage(img, 0, 0, cols, rows, 0, 0, thumb, high);
    }
    var children = [el("p", { cls: "ar-multiples-title", text: twoAxes
      ? "Every layer × head (click one, or use the arrow keys, to show it above):"
      : "All heads side by side (click one to show it above):" })];
    if (filterable) {
      var choice = el("select", { cls: "ar-filter", "aria-label": "what the small maps show" }, [
        el("option", { value: "map", text: "whole maps" }),
        el("option", { value: "row", text: "the followed token's row: what it attends to" }),
        el("option", { value: "col", text: "the followed token's column: what attends to it" })
      ]);
      choice.addEventListener("change", function () {
        state.filter = choice.value;
        views.forEach(function (v) { v.redraw("token"); });
      });
      children.push(el("label", { cls: "ar-filter-box" }, ["Token filter (", el("span", { cls: "ar-filter-token",
        text: data.labels[Math.max(0, state.token)] }), "): ", choice]));
    }
    children.push(grid);
    view.node = el("div", { cls: "ar-multiples-box" }, children);
    views.push(view);
    return view;
  }

  // ---------------------------------------------------------------- one step's card
  function buildStep(step, sec) {
    var rc = dims(step);
    var big = step.map && (rc[0] > TABLE_MAX || rc[1] > TABLE_MAX);
    var wide = rc[1] > 8;
    var cls = "ar-step" + (step.map ? " ar-step-map" : "") + (wide ? " ar-step-wide" : "");
    var card = el("article", { cls: cls, "data-step": step.id }, [
      el("h3", null, [step.title + " ", el("code", { cls: "ar-id", text: step.id })]),
      step.why ? el("p", { cls: "ar-why", text: step.why }) : null,
      step.formula ? el("p", { cls: "ar-formula" }, [el("code", { text: step.formula })]) : null
    ]);
    var leads = leadIndices(step);
    var box = el("div", { cls: "ar-views" });
    var started = [];
    if (big) {
      var cv = canvasView(step, sec, panelName(step, currentLead(step, sec)));
      box.appendChild(cv.node);
      started.push(cv);
    } else {
      leads.forEach(function (lead) {
        var caption = panelName(step, lead);
        var attrs = { cls: "ar-panel" };
        var perHead = step.head_axis !== null && step.head_axis < lead.length;
        if (perHead) attrs["data-head"] = lead[step.head_axis];
        if (perHead && step.axes[0] === "layer") attrs["data-layer"] = lead[0];
        var scroll = el("div", { cls: "ar-scroll" + (rc[0] > TABLE_MAX ? " ar-scroll-tall" : "") });
        var fig = el("figure", attrs, [caption ? el("figcaption", { text: caption }) : null, scroll,
          step.map ? colorBar(step) : null]);
        // a head's tables are built when the head is first shown (many heads x layers stay light)
        fig.attnlabBuild = function () { if (!scroll.firstChild) scroll.appendChild(buildTable(step, lead, caption)); };
        if (!perHead && rc[0] > TABLE_MAX) whenShown(fig, fig.attnlabBuild);  // long tables: when scrolled to
        else if (!perHead) fig.attnlabBuild();
        else fig.hidden = true;
        box.appendChild(fig);
      });
    }
    card.appendChild(box);
    if (step.map && step.head_axis !== null && leads.length > 1) {
      var ov = overview(step, sec);
      card.appendChild(ov.node);
      started.push(ov);
    }
    if (step.detail && step.detail.length) {
      card.appendChild(el("ul", { cls: "ar-detail" }, step.detail.map(function (d) { return el("li", { text: d }); })));
    }
    card.attnlabStart = function () { started.forEach(function (v) { v.start(); }); };
    return card;
  }

  // ---------------------------------------------------------------- "follow a token" panel
  function followItems(sec, t) {
    var items = [], sel = state.sel[sec.id];
    sec.steps.forEach(function (id) {
      var step = data.steps[id], n = step.shape.length, cols = step.shape[n - 1];
      if (step.one_row) {
        if (t === data.query && (step.axes[n - 1] === "key" || step.axes[n - 1] === "dim")) {
          items.push({ step: step, lines: [rowName(step, [0]) + " = " + vector(step, 0, cols, LIMIT)] });
        }
        return;
      }
      if (n < 2 || !isTokenAxis(step, n - 2)) return;
      var lines = [];
      leadIndices(step).forEach(function (lead) {
        if (step.head_axis !== null && step.head_axis < lead.length && lead[step.head_axis] !== sel.head) return;
        var index = lead.concat([t]), k0 = flat(step, index.concat([0]));
        lines.push(rowName(step, index) + " = " + vector(step, k0, cols, LIMIT));
        if (step.map && cols > 8) lines.push("  most to: " + largest(step, k0, cols, step.labels[n - 1], 3));
        if (step.spell_out && cols <= 8) {
          for (var d = 0; d < cols; d++) lines.push("  " + templateLines(step, index.concat([d]))[0]);
        }
      });
      if (lines.length) items.push({ step: step, lines: lines });
    });
    return items;
  }
  function renderFollow(sec) {
    var box = root.querySelector('[data-section="' + sec.id + '"] .ar-follow');
    if (!box) return;
    var t = state.token, label = data.labels[t], sel = state.sel[sec.id];
    var items = followItems(sec, t);
    box.textContent = "";
    box.appendChild(el("h3", { cls: "ar-follow-title" }, [
      "Step by step for ", el("span", { cls: "ar-follow-token", text: label }),
      sec.heads.length ? " (head " + sec.heads[sel.head] + ")" : ""
    ]));
    if (!items.length) {
      var only = followItems(sec, data.query).length;
      box.appendChild(el("p", { cls: "ar-note", text: only
        ? "This section follows the query “" + data.labels[data.query] + "” only (choose another with --query); click it to see its numbers."
        : "No step of this section has a row for a single token." }));
      return;
    }
    var list = el("ol", { cls: "ar-follow-list" });
    items.forEach(function (it) {
      list.appendChild(el("li", null, [
        el("span", { cls: "ar-follow-step", text: it.step.title }),
        it.step.formula ? el("code", { cls: "ar-follow-formula", text: it.step.formula }) : null,
        el("div", { cls: "ar-follow-lines" }, it.lines.map(function (l) { return el("div", { text: l }); }))
      ]));
    });
    box.appendChild(list);
  }

  // ---------------------------------------------------------------- keyboard in a table
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
  var tokens = el("div", { cls: "ar-tokens", role: "group", "aria-label": "tokens to follow", tabindex: "-1" },
    data.labels.map(function (label, i) { return tokenButton(i, label, "ar-tok-chip"); }));
  var more = el("span", { cls: "ar-bar-more", hidden: true, text: nTok + " tokens: scroll for more ↕" });
  var header = el("header", { cls: "ar-header" }, [
    el("h1", { text: data.title || "Attention, step by step" }),
    el("p", { cls: "ar-sub", text: data.subtitle ||
      "Every number below is a recorded step of attnlab explain (" + data.settings_text + ")." })
  ]);
  (data.notices || []).forEach(function (n) {
    header.appendChild(el("p", { cls: "ar-notice", role: "status" }, [el("strong", { text: "Note: " }), n]));
  });
  header.appendChild(toc);
  app.appendChild(header);
  app.appendChild(el("div", { cls: "ar-bar" }, [el("span", { cls: "ar-bar-label", text: "Follow a token:" }), tokens, more]));
  var reasonsShown = [];  // every reason a masked cell has in this report, in MASK_WORDS' order
  Object.keys(data.steps).forEach(function (k) {
    var s = data.steps[k];
    if (!s.masked) return;
    (s.mask_reasons || [["future", null]]).forEach(function (r) {
      if (reasonsShown.indexOf(r[0]) < 0) reasonsShown.push(r[0]);
    });
  });
  reasonsShown.sort(function (a, b) {
    var order = Object.keys(MASK_WORDS);
    return order.indexOf(a) - order.indexOf(b);
  });
  var anyCanvas = Object.keys(data.steps).some(function (k) {
    var s = data.steps[k], d = dims(s);
    return s.map && (d[0] > TABLE_MAX || d[1] > TABLE_MAX);
  });
  var legend = el("div", { cls: "ar-legend", role: "note", "aria-label": "legend" }, [
    el("span", { cls: "ar-legend-item" }, [el("span", { cls: "ar-swatch ar-swatch-grad", style: "background:" + gradient() }),
      "low → high value (each map runs from its smallest to its largest number; its bar gives the range)"]),
  ].concat(reasonsShown.map(function (r) {
    return el("span", { cls: "ar-legend-item ar-legend-masked" }, [el("span", { cls: "ar-swatch ar-masked ar-masked-" + r }),
      "masked: " + maskWords(r) + " (a score set to −inf, a weight of 0)"]);
  })).concat([
    el("span", { cls: "ar-legend-item" }, [el("span", { cls: "ar-swatch ar-swatch-sel" }),
      "the row of the token you follow"]),
    el("span", { cls: "ar-legend-item ar-legend-hint", text: anyCanvas
      ? "Large maps are pictures: hover a cell (or focus it and use the arrow keys) to read its number and how it is made; − / + zoom, drag to pan; click a token to follow it."
      : "Hover, tap or focus a cell (arrow keys move) to see how its number is made; click a token to follow its computation." })
  ]));
  app.appendChild(legend);

  var cards = [];
  data.sections.forEach(function (sec) {
    state.sel[sec.id] = { head: sec.head || 0, layer: 0 };
    var box = el("section", { cls: "ar-section", "data-section": sec.id, id: uid + "-" + sec.id,
      "aria-labelledby": uid + "-" + sec.id + "-h" }, [
      el("h2", { id: uid + "-" + sec.id + "-h", text: sec.title })
    ]);
    var layered = sec.steps.map(function (id) { return data.steps[id]; }).filter(function (s) { return s.axes[0] === "layer" && s.map; })[0];
    if (layered && layered.shape[0] > 1) {
      box.appendChild(el("div", { cls: "ar-heads ar-layers", role: "group", "aria-label": "layers" }, [
        el("span", { cls: "ar-bar-label", text: "Layer:" })
      ].concat(layered.labels[0].map(function (label, l) {
        return el("button", { type: "button", cls: "ar-layer-btn", "data-layer": l, text: "layer " + label,
          "aria-pressed": l === 0 ? "true" : "false", onclick: function () { select(sec, { layer: l }); } });
      }))));
    }
    if (sec.heads.length) {
      box.appendChild(el("div", { cls: "ar-heads", role: "group", "aria-label": "heads" }, [
        el("span", { cls: "ar-bar-label", text: "Head:" })
      ].concat(sec.heads.map(function (label, h) {
        return el("button", { type: "button", cls: "ar-head-btn", "data-head": h, text: "head " + label,
          "aria-pressed": h === state.sel[sec.id].head ? "true" : "false", onclick: function () { select(sec, { head: h }); } });
      }))));
    }
    var hasFollow = sec.steps.some(function (id) {
      var s = data.steps[id], n = s.shape.length;
      return s.one_row ? s.axes[n - 1] === "key" || s.axes[n - 1] === "dim" : n >= 2 && isTokenAxis(s, n - 2);
    });
    if (hasFollow) box.appendChild(el("div", { cls: "ar-follow", "aria-live": "polite" }));
    var steps = el("div", { cls: "ar-steps" });
    sec.steps.forEach(function (id) { var card = buildStep(data.steps[id], sec); cards.push(card); steps.appendChild(card); });
    box.appendChild(steps);
    app.appendChild(box);
  });
  app.appendChild(tip);
  cards.forEach(function (card) { card.attnlabStart(); });
  data.sections.forEach(function (sec) { if (sec.heads.length) select(sec, {}); else renderFollow(sec); });
  timings.head = [];
  function checkBar() { more.hidden = tokens.scrollHeight <= tokens.clientHeight + 2 && tokens.scrollWidth <= tokens.clientWidth + 2; }
  checkBar();
  window.addEventListener("resize", checkBar);

  // Pointer and focus on tables: one set of listeners on the root.
  root.addEventListener("mouseover", function (ev) {
    var td = ev.target.closest && ev.target.closest("td[data-k]");
    if (td && root.contains(td)) tdTip(td);
  });
  root.addEventListener("mouseout", function (ev) {
    var td = ev.target.closest && ev.target.closest("td[data-k]");
    if (td && !(ev.relatedTarget && td.contains(ev.relatedTarget))) hideTip();
  });
  root.addEventListener("focusin", function (ev) {
    if (ev.target.matches && ev.target.matches("td[data-k]")) tdTip(ev.target);
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
      tdTip(td);
    }
  });
  root.addEventListener("keydown", onGridKey);
  timings.ready = performance.now();
  return { selectToken: selectToken, select: function (secId, change) {
    select(data.sections.filter(function (s) { return s.id === secId; })[0], change);
  } };
}
