/* deconflow sweep report: hand-written, no library. Reads the JSON embedded in the page
   and draws every chart as inline SVG. Every run-level mark carries data-run (click: the
   run panel) and data-tip (hover: a tooltip naming the run). */
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const STATUS_COLORS = {materialized: "#2e7d32", diverged: "#f9a825", running: "#1e88e5",
                         failed: "#c62828", missing: "#d0d0d0"};
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                   "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
  const TRAIN = "#1f77b4", VAL = "#e6550d";

  // ---------- helpers ----------
  function objects(t) {
    return t.rows.map(r => Object.fromEntries(t.columns.map((c, i) => [c, r[i]])));
  }
  function el(tag, attrs, parent, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) if (attrs[k] != null) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function sv(tag, attrs, parent, text) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs || {}) if (attrs[k] != null) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v) {
    if (v == null) return "";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(+v.toPrecision(4));
  }
  const body = id => document.querySelector("#" + id + " .body");
  const finite = v => typeof v === "number" && isFinite(v);
  const RUNS = objects(D.runs);
  const BYID = new Map(RUNS.map(r => [r.run_id, r]));
  const COMP = objects(D.completeness);
  const COMP_BY = new Map(COMP.map(r => [r.run_id, r]));
  const cellName = (v, lr, wd) => v + " lr " + fmt(lr) + " wd " + fmt(wd);
  function runTip(id, extra) {
    const r = BYID.get(id) || COMP_BY.get(id) || {};
    let s = id;
    if (r.outcome) s += "  (" + r.outcome + ")";
    if (extra) s += "\n" + extra;
    return s;
  }
  function runLink(id, parent) {
    return el("a", {"class": "run", "data-run": id, "data-tip": runTip(id)}, parent, id);
  }
  function note(parent, text) { return el("p", {"class": "note"}, parent, text); }
  function missing(parent, text) { return el("p", {"class": "missing"}, parent, text); }

  // ---------- scales and chart frames ----------
  function scale(lo, hi, a, b, log) {
    if (log) { lo = Math.log10(lo); hi = Math.log10(hi); }
    if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
    const f = v => a + ((log ? Math.log10(v) : v) - lo) / (hi - lo) * (b - a);
    f.ticks = function () {
      const out = [];
      if (log) {
        const span = hi - lo;
        const mult = span < 1.2 ? [1, 2, 3, 5] : span < 2.5 ? [1, 2, 5] : [1];
        for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
          for (const m of mult) {
            const v = m * Math.pow(10, e), lv = Math.log10(v);
            if (lv >= lo - 1e-9 && lv <= hi + 1e-9) out.push(v);
          }
        }
        return out;
      }
      const step0 = (hi - lo) / 5, p = Math.pow(10, Math.floor(Math.log10(step0)));
      const step = [1, 2, 2.5, 5, 10].map(m => m * p).find(s => s >= step0) || step0;
      for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toPrecision(12));
      return out;
    };
    f.log = log;
    return f;
  }
  function extent(values, log) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) {
      if (!finite(v) || (log && v <= 0)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (lo === Infinity) return log ? [1, 10] : [0, 1];
    if (log) return [lo / 1.15, hi * 1.15];
    const pad = (hi - lo) * 0.06 || Math.abs(lo) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }
  function chart(parent, o) {
    const m = {l: 46, r: 10, t: o.title ? 20 : 8, b: 34};
    const w = o.w || 260, h = o.h || 200;
    const svg = sv("svg", {"class": "chart", width: w, height: h, "data-chart": o.kind || "chart",
                           viewBox: "0 0 " + w + " " + h}, parent);
    const X = scale(o.x[0], o.x[1], m.l, w - m.r, o.xlog);
    const Y = scale(o.y[0], o.y[1], h - m.b, m.t, o.ylog);
    const ax = sv("g", {"class": "axis"}, svg);
    for (const t of X.ticks()) {
      const x = X(t);
      sv("line", {"class": "grid", x1: x, x2: x, y1: m.t, y2: h - m.b}, ax);
      sv("text", {x: x, y: h - m.b + 12, "text-anchor": "middle"}, ax, fmt(t));
    }
    for (const t of Y.ticks()) {
      const y = Y(t);
      sv("line", {"class": "grid", x1: m.l, x2: w - m.r, y1: y, y2: y}, ax);
      sv("text", {x: m.l - 4, y: y + 3, "text-anchor": "end"}, ax, fmt(t));
    }
    sv("path", {d: "M" + m.l + "," + m.t + "V" + (h - m.b) + "H" + (w - m.r), fill: "none"}, ax);
    if (o.xlabel) sv("text", {x: (m.l + w - m.r) / 2, y: h - 4, "text-anchor": "middle"}, ax, o.xlabel);
    if (o.ylabel) sv("text", {x: 10, y: (m.t + h - m.b) / 2, "text-anchor": "middle",
                              transform: "rotate(-90 10 " + (m.t + h - m.b) / 2 + ")"}, ax, o.ylabel);
    if (o.title) sv("text", {"class": "title", x: m.l, y: 13}, svg, o.title);
    const id = "c" + Math.random().toString(36).slice(2);
    const clip = sv("clipPath", {id: id}, sv("defs", {}, svg));
    sv("rect", {x: m.l, y: m.t - 2, width: w - m.l - m.r, height: h - m.t - m.b + 4}, clip);
    const g = sv("g", {"clip-path": "url(#" + id + ")"}, svg);
    return {svg: svg, g: g, X: X, Y: Y};
  }
  function pathD(X, Y, xs, ys) {
    let d = "", pen = false;
    for (let i = 0; i < xs.length; i++) {
      const ok = finite(xs[i]) && finite(ys[i]) && (!X.log || xs[i] > 0) && (!Y.log || ys[i] > 0);
      if (!ok) { pen = false; continue; }
      d += (pen ? "L" : "M") + X(xs[i]).toFixed(1) + "," + Y(ys[i]).toFixed(1);
      pen = true;
    }
    return d;
  }
  function bandD(X, Y, xs, lo, hi) {
    const idx = xs.map((_, i) => i).filter(i => xs[i] > 0 && lo[i] > 0 && hi[i] > 0);
    if (!idx.length) return "";
    let d = "M" + idx.map(i => X(xs[i]).toFixed(1) + "," + Y(hi[i]).toFixed(1)).join("L");
    d += "L" + idx.reverse().map(i => X(xs[i]).toFixed(1) + "," + Y(lo[i]).toFixed(1)).join("L");
    return d + "Z";
  }

  // ---------- tooltip, selection ----------
  const tip = document.getElementById("tip");
  function place(e) {
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let x = e.clientX + 14, y = e.clientY + 14;
    if (x + w > window.innerWidth - 4) x = Math.max(4, e.clientX - w - 14);
    if (y + h > window.innerHeight - 4) y = Math.max(4, e.clientY - h - 14);
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  document.addEventListener("mouseover", e => {
    const t = e.target.closest ? e.target.closest("[data-tip]") : null;
    if (!t) { tip.style.display = "none"; return; }
    tip.textContent = t.getAttribute("data-tip");
    tip.style.display = "block";
    place(e);
  });
  document.addEventListener("mousemove", e => { if (tip.style.display === "block") place(e); });
  document.addEventListener("click", e => {
    const t = e.target.closest ? e.target.closest("[data-run]") : null;
    if (t) showRun(t.getAttribute("data-run"));
  });
  const panel = document.getElementById("panel");
  document.getElementById("panel-close").addEventListener("click", e => {
    e.stopPropagation(); panel.hidden = true;
  });
  document.addEventListener("keydown", e => { if (e.key === "Escape") panel.hidden = true; });

  // ---------- generic sortable, filterable table ----------
  function table(parent, columns, rows, o) {
    o = o || {};
    const max = o.max || 1000;
    const wrap = el("div", {}, parent);
    let input = null;
    if (o.filter) input = el("input", {"class": "filter", type: "search",
                                       placeholder: o.placeholder || "filter rows (any text)"}, wrap);
    const count = el("span", {"class": "note"}, wrap);
    const box = el("div", {"class": "tablewrap"}, wrap);
    const t = el("table", {"class": "sortable" + (o.cls ? " " + o.cls : "")}, box);
    const numeric = columns.map(c => rows.some(r => typeof r[c] === "number") &&
                                     rows.every(r => r[c] == null || typeof r[c] === "number"));
    const hr = el("tr", {}, el("thead", {}, t));
    const ths = columns.map((c, i) => el("th", {"class": "sort" + (numeric[i] ? "" : " l"),
                                                "data-col": c, title: "click to sort"}, hr, c));
    const tb = el("tbody", {}, t);
    let key = null, dir = 1, shown = rows;
    function draw() {
      const q = input ? input.value.trim().toLowerCase() : "";
      shown = q ? rows.filter(r => columns.some(c => r[c] != null &&
                                                     fmt(r[c]).toLowerCase().includes(q))) : rows;
      if (key != null) {
        const num = numeric[columns.indexOf(key)];
        shown = shown.slice().sort((a, b) => {
          const x = a[key], y = b[key];
          if (x == null && y == null) return 0;
          if (x == null) return 1;
          if (y == null) return -1;
          return dir * (num ? x - y : String(x).localeCompare(String(y), undefined, {numeric: true}));
        });
      }
      tb.textContent = "";
      const frag = document.createDocumentFragment();
      for (const r of shown.slice(0, max)) {
        const tr = el("tr", o.runCol && r[o.runCol] ? {"data-run": r[o.runCol]} : {}, frag);
        columns.forEach((c, i) => {
          const td = el("td", {"class": numeric[i] ? null : "l"}, tr);
          if (o.render && o.render[c]) o.render[c](td, r[c], r);
          else td.textContent = fmt(r[c]);
        });
      }
      tb.appendChild(frag);
      count.textContent = " " + (shown.length === rows.length ? rows.length + " rows"
        : shown.length + " of " + rows.length + " rows match") +
        (shown.length > max ? "; the first " + max + " shown (all of them are in DuckDB)" : "");
    }
    ths.forEach(th => th.addEventListener("click", () => {
      const c = th.getAttribute("data-col");
      dir = key === c ? -dir : 1; key = c;
      ths.forEach(x => x.classList.remove("asc", "desc"));
      th.classList.add(dir > 0 ? "asc" : "desc");
      draw();
    }));
    if (input) input.addEventListener("input", draw);
    draw();
    return t;
  }

  // ---------- header counts ----------
  (function counts() {
    const p = document.getElementById("counts");
    const c = {};
    for (const r of COMP) c[r.status] = (c[r.status] || 0) + 1;
    el("span", {}, p, COMP.length + " cells");
    for (const k of Object.keys(c).sort()) {
      const s = el("span", {}, p);
      el("span", {"class": "swatch", style: "background:" + (STATUS_COLORS[k] || "#999")}, s);
      s.appendChild(document.createTextNode(k + " " + c[k]));
    }
    el("span", {}, p, RUNS.length + " runs fitted");
  })();

  // ---------- verdicts ----------
  function ciSketch(parent, r) {
    const w = 170, h = 20;
    const vals = [r.ci_low, r.ci_high, r.threshold, r.value].filter(finite);
    const lo = Math.min(0, ...vals), hi = Math.max(1, ...vals);
    const svg = sv("svg", {"class": "chart", width: w, height: h, "data-chart": "ci"}, parent);
    const X = scale(lo, hi, 4, w - 4, false);
    sv("line", {x1: 4, x2: w - 4, y1: h / 2, y2: h / 2, stroke: "#ddd"}, svg);
    if (finite(r.threshold)) sv("line", {x1: X(r.threshold), x2: X(r.threshold), y1: 1, y2: h - 1,
                                         stroke: "#333", "stroke-dasharray": "2,2"}, svg);
    const col = {PASS: "#2e7d32", FAIL: "#c62828"}[r.verdict] || "#ef8f00";
    const tipText = r.hypothesis + " " + r.scope + " " + r.method + ": " + fmt(r.value) +
      " [" + fmt(r.ci_low) + ", " + fmt(r.ci_high) + "] vs threshold " + fmt(r.threshold);
    if (finite(r.ci_low) && finite(r.ci_high))
      sv("line", {x1: X(r.ci_low), x2: X(r.ci_high), y1: h / 2, y2: h / 2, stroke: col,
                  "stroke-width": 4, "data-tip": tipText}, svg);
    if (finite(r.value)) sv("circle", {cx: X(r.value), cy: h / 2, r: 3.5, fill: "#000",
                                       "data-tip": tipText}, svg);
  }
  function verdictTable(parent, rows, cols) {
    const t = el("table", {}, parent);
    const hr = el("tr", {}, el("thead", {}, t));
    for (const c of cols) el("th", {"class": ["hypothesis", "scope", "method", "tier", "note", "verdict"].includes(c) ? "l" : null}, hr, c === "ci" ? "95% CI vs threshold" : c);
    const tb = el("tbody", {}, t);
    for (const r of rows) {
      const tr = el("tr", {}, tb);
      for (const c of cols) {
        const td = el("td", {"class": typeof r[c] === "number" ? null : "l"}, tr);
        if (c === "verdict") el("span", {"class": "badge " + r.verdict}, td, r.verdict);
        else if (c === "ci") ciSketch(td, r);
        else if (c === "CI") td.textContent = finite(r.ci_low) ? "[" + fmt(r.ci_low) + ", " + fmt(r.ci_high) + "]" : "none";
        else td.textContent = fmt(r[c]);
      }
    }
  }
  (function verdicts() {
    const b = body("verdicts");
    const rows = objects(D.verdicts);
    if (!rows.length) { missing(b, "no hypotheses table yet"); return; }
    const want = ["hypothesis", "scope", "method", "tier", "verdict", "value", "CI", "ci",
                  "threshold", "n", "smoothing", "note"];
    const cols = want.filter(c => ["verdict", "CI", "ci"].includes(c) || D.verdicts.columns.includes(c));
    if (D.verdicts.has_primary) {
      const prim = rows.filter(r => r.primary);
      note(b, "One pre-declared primary row per hypothesis. PASS: the 95% CI clears the threshold; " +
              "FAIL: the CI lies wholly on the wrong side; otherwise INCONCLUSIVE.");
      verdictTable(b, prim, cols);
      const rest = rows.filter(r => !r.primary);
      if (rest.length) {
        const d = el("details", {}, b);
        el("summary", {}, d, rest.length + " secondary and exploratory rows");
        verdictTable(d, rest, cols);
      }
    } else {
      note(b, "The hypotheses table marks no primary row yet: every row is shown. Verdict from " +
              "the 95% CI against the threshold (PASS: the CI clears it; FAIL: wholly below; " +
              "else INCONCLUSIVE).");
      verdictTable(b, rows, cols);
    }
  })();

  // ---------- quality gates ----------
  (function gates() {
    const b = body("gates");
    const G = D.gates;
    if (!G.evaluated) { missing(b, "quality gates not evaluated: no published DuckDB file yet, or it could not be read (the sweep_report asset's log says why)"); return; }
    const p = el("p", {}, b);
    el("span", {"class": "badge " + (G.go ? "GO" : "NO-GO")}, p, G.go ? "GO" : "NO-GO");
    p.appendChild(document.createTextNode(" " + G.gates.filter(g => !g.passed).length + " of " +
      G.gates.length + " gates fail; each cell lists the runs of that variant the gate names."));
    const t = el("table", {}, b);
    const hr = el("tr", {}, el("thead", {}, t));
    el("th", {"class": "l"}, hr, "gate");
    el("th", {"class": "l"}, hr, "verdict");
    for (const v of G.variants) el("th", {"class": "l"}, hr, v);
    el("th", {"class": "l"}, hr, "detail");
    const tb = el("tbody", {}, t);
    for (const g of G.gates) {
      const tr = el("tr", {}, tb);
      el("td", {"class": "l"}, tr, g.gate);
      const st = g.passed ? (g.violations ? "WARN" : "PASS") : "FAIL";
      el("span", {"class": "badge " + st}, el("td", {"class": "l"}, tr), st);
      for (const v of G.variants) {
        const td = el("td", {"class": "l"}, tr);
        const runs = g.runs[v] || [];
        if (!runs.length) { td.textContent = "\u2713"; continue; }
        el("b", {}, td, runs.length + (runs.length === 1 ? " run: " : " runs: "));
        runs.slice(0, 4).forEach((r, i) => { if (i) td.appendChild(document.createTextNode(", ")); runLink(r, td); });
        if (runs.length > 4) {
          const d = el("details", {}, td);
          el("summary", {}, d, "+" + (runs.length - 4) + " more");
          runs.slice(4).forEach((r, i) => { if (i) d.appendChild(document.createTextNode(", ")); runLink(r, d); });
        }
      }
      el("td", {"class": "l note"}, tr, g.detail);
    }
  })();

  // ---------- completeness ----------
  (function completeness() {
    const b = body("completeness");
    if (!COMP.length) { missing(b, "no completeness table yet"); return; }
    const leg = el("p", {"class": "legend"}, b);
    for (const k in STATUS_COLORS) {
      const s = el("span", {}, leg);
      el("span", {"class": "swatch", style: "background:" + STATUS_COLORS[k]}, s);
      s.appendChild(document.createTextNode(k));
    }
    note(b, "One square per cell (rows: lr x weight decay, columns: seeds). Hover names the run and " +
            "its status; click opens it.");
    const wrap = el("div", {"class": "panels"}, b);
    const variants = [...new Set(COMP.map(r => r.variant))].sort();
    const lrs = [...new Set(COMP.map(r => r.lr))].sort((a, c) => a - c);
    const wds = [...new Set(COMP.map(r => r.weight_decay))].sort((a, c) => a - c);
    const seeds = [...new Set(COMP.map(r => r.seed))].sort((a, c) => a - c);
    const cs = Math.max(3, Math.min(14, Math.floor(700 / seeds.length)));
    for (const v of variants) {
      const rowsOf = COMP.filter(r => r.variant === v);
      const w = 92 + seeds.length * cs, h = 24 + lrs.length * wds.length * (cs + 1);
      const svg = sv("svg", {"class": "chart", width: w, height: h, "data-chart": "completeness"}, wrap);
      sv("text", {"class": "title", x: 0, y: 13}, svg, v);
      const at = new Map(rowsOf.map(r => [r.lr + "|" + r.weight_decay + "|" + r.seed, r]));
      let y = 20;
      for (const lr of lrs) for (const wd of wds) {
        sv("text", {x: 88, y: y + cs - 2, "text-anchor": "end"}, svg, "lr " + fmt(lr) + " wd " + fmt(wd));
        seeds.forEach((s, i) => {
          const r = at.get(lr + "|" + wd + "|" + s);
          if (!r) return;
          sv("rect", {x: 92 + i * cs, y: y, width: cs - 1, height: cs, fill: STATUS_COLORS[r.status] || "#999",
                      "data-run": r.run_id, "data-tip": r.run_id + "\n" + r.status + ": " + (r.reason || "")}, svg);
        });
        y += cs + 1;
      }
    }
  })();

  // ---------- curves: seed mean and band per cell ----------
  (function curves() {
    const b = body("curves");
    const bands = D.bands;
    if (!bands.length) { missing(b, "no curves yet: no run has landed"); return; }
    note(b, "Per (variant, lr, weight decay) cell: train loss (blue) and validation loss (orange, dashed) " +
            "against the step, log-log; the line is the geometric mean over seeds, the band \u00d7/\u00f7 one " +
            "standard deviation of log loss across seeds. Thin lines: each seed's train loss " +
            "(cells of up to 12 seeds). Curves are downsampled to at most " + (D.bins + 1) +
            " points each for this page; DuckDB holds every logged point. Hover names the run(s); click a seed's line for its run.");
    const leg = el("p", {"class": "legend"}, b);
    el("span", {style: "color:" + TRAIN}, leg, "\u2501 train (seed mean \u00b1 band)");
    el("span", {style: "color:" + VAL}, leg, "\u2505 validation (seed mean \u00b1 band)");
    const xs = [], ys = [];
    for (const c of bands) { xs.push(...c.t); ys.push(...c.lo, ...c.hi); }
    const X0 = extent(xs, true), Y0 = extent(ys, true);
    const byCell = new Map();
    for (const c of bands) {
      const k = c.variant + "|" + c.lr + "|" + c.wd;
      if (!byCell.has(k)) byCell.set(k, {});
      byCell.get(k)[c.curve] = c;
    }
    const runsOf = new Map();
    for (const r of RUNS) {
      const k = r.variant + "|" + r.lr + "|" + r.weight_decay;
      if (!runsOf.has(k)) runsOf.set(k, []);
      runsOf.get(k).push(r);
    }
    for (const v of D.variants) {
      el("h3", {}, b, v);
      const wrap = el("div", {"class": "panels"}, b);
      for (const lr of D.lrs) for (const wd of D.wds) {
        const k = v + "|" + lr + "|" + wd;
        const cell = byCell.get(k), runs = (runsOf.get(k) || []).sort((a, c) => a.seed - c.seed);
        const div = runs.filter(r => r.outcome === "diverged").length;
        const ch = chart(wrap, {w: 250, h: 180, x: X0, y: Y0, xlog: true, ylog: true, kind: "curves",
                                title: "lr " + fmt(lr) + ", wd " + fmt(wd) + " (" + runs.length + " runs" +
                                       (div ? ", " + div + " diverged" : "") + ")", xlabel: "step"});
        if (!cell) continue;
        const names = runs.map(r => r.run_id);
        const shown = names.slice(0, 6).join("\n") + (names.length > 6 ? "\n+" + (names.length - 6) + " more" : "");
        if (runs.length <= 12) for (const r of runs) {
          const c = D.train[r.run_id];
          if (!c) continue;
          sv("path", {"class": "seed", d: pathD(ch.X, ch.Y, c[0], c[1]), stroke: TRAIN,
                      "data-run": r.run_id, "data-tip": runTip(r.run_id, "train loss, seed " + r.seed)}, ch.g);
        }
        for (const [which, col, dash] of [["train", TRAIN, null], ["val", VAL, "4,3"]]) {
          const c = cell[which];
          if (!c) continue;
          const label = cellName(v, lr, wd) + ": " + (which === "train" ? "train" : "validation") +
                        " loss, mean of " + Math.max(...c.n) + " seeds\n" + shown;
          sv("path", {d: bandD(ch.X, ch.Y, c.t, c.lo, c.hi), fill: col, "fill-opacity": 0.18,
                      stroke: "none", "data-tip": label, "data-cell": k}, ch.g);
          sv("path", {d: pathD(ch.X, ch.Y, c.t, c.m), fill: "none", stroke: col, "stroke-width": 1.6,
                      "stroke-dasharray": dash, "data-tip": label, "data-cell": k}, ch.g);
        }
      }
    }
  })();

  // ---------- H2 within strata ----------
  function lineThrough(ch, tr, x0, x1, col, tipText) {
    if (tr.slope == null) return;
    sv("line", {x1: ch.X(x0), x2: ch.X(x1), y1: ch.Y(tr.intercept + tr.slope * x0),
                y2: ch.Y(tr.intercept + tr.slope * x1), stroke: col, "stroke-width": 1.6,
                "data-tip": tipText}, ch.g);
  }
  (function h2() {
    const b = body("h2");
    const pts = RUNS.filter(r => finite(r.alpha_early) && finite(r.best_val_ce) && r.outcome !== "diverged");
    if (!pts.length) { missing(b, "no run with both alpha_early and best_val_ce yet"); return; }
    note(b, "The primary question is asked within each variant (arms that differ in kind are not pooled): " +
            "one panel per variant, points coloured by learning rate, with that variant's least-squares " +
            "trend. The pooled trend is shown only beside them, as exploratory. " +
            (RUNS.length - pts.length) + " runs are not plotted (diverged, or no finite value; see exclusions).");
    const X0 = extent(pts.map(r => r.alpha_early)), Y0 = extent(pts.map(r => r.best_val_ce));
    const lrCol = new Map(D.lrs.map((lr, i) => [lr, PALETTE[i % PALETTE.length]]));
    const leg = el("p", {"class": "legend"}, b);
    for (const [lr, c] of lrCol) {
      const s = el("span", {}, leg);
      el("span", {"class": "swatch", style: "background:" + c}, s);
      s.appendChild(document.createTextNode("lr " + fmt(lr)));
    }
    const wrap = el("div", {"class": "panels"}, b);
    const strata = el("div", {"class": "panels"}, wrap);
    function dots(ch, rows, colOf) {
      for (const r of rows) sv("circle", {cx: ch.X(r.alpha_early).toFixed(1), cy: ch.Y(r.best_val_ce).toFixed(1), r: 3,
        fill: colOf(r), "fill-opacity": 0.8, stroke: "#fff", "stroke-width": 0.5, "data-run": r.run_id,
        "data-tip": runTip(r.run_id, "lr " + fmt(r.lr) + ", wd " + fmt(r.weight_decay) + ", seed " + r.seed +
                                     "\nalpha_early " + fmt(r.alpha_early) + ", best_val_ce " + fmt(r.best_val_ce))}, ch.g);
    }
    for (const v of D.variants) {
      const rows = pts.filter(r => r.variant === v);
      const tr = D.h2.strata[v] || {n: 0};
      const ch = chart(strata, {w: 235, h: 220, x: X0, y: Y0, kind: "h2",
        title: v + ": n=" + rows.length + (tr.r != null ? ", r=" + fmt(tr.r) : ""),
        xlabel: "alpha_early", ylabel: "best_val_ce"});
      lineThrough(ch, tr, X0[0], X0[1], "#333", v + " trend within variant: r=" + fmt(tr.r) + ", n=" + tr.n);
      dots(ch, rows, r => lrCol.get(r.lr) || "#777");
    }
    const pooled = el("div", {"class": "divider"}, wrap);
    const vCol = new Map(D.variants.map((v, i) => [v, PALETTE[(i + 4) % PALETTE.length]]));
    const tr = D.h2.pooled;
    const ch = chart(pooled, {w: 250, h: 220, x: X0, y: Y0, kind: "h2-pooled",
      title: "pooled (exploratory): n=" + pts.length + (tr.r != null ? ", r=" + fmt(tr.r) : ""),
      xlabel: "alpha_early", ylabel: "best_val_ce"});
    lineThrough(ch, tr, X0[0], X0[1], "#888", "pooled trend (mixes variants): r=" + fmt(tr.r) + ", n=" + tr.n);
    dots(ch, pts, r => vCol.get(r.variant));
    const l2 = el("p", {"class": "legend"}, pooled);
    for (const [v, c] of vCol) {
      const s = el("span", {}, l2);
      el("span", {"class": "swatch", style: "background:" + c}, s);
      s.appendChild(document.createTextNode(v));
    }
  })();

  // ---------- hyper-parameters: parallel coordinates ----------
  (function hparams() {
    const b = body("hparams");
    if (!RUNS.length) { missing(b, "no run yet"); return; }
    note(b, "Parallel coordinates: one line per run across variant, learning rate, weight decay and its " +
            "outcomes; coloured by best validation CE (blue: low, red: high; grey dashed: diverged or " +
            "no value). Hover names the run, click opens it; click an axis label to keep only the runs " +
            "in the upper or lower half of that axis (click again to clear).");
    const axes = [
      {k: "variant", cat: D.variants},
      {k: "lr", cat: D.lrs},
      {k: "weight_decay", cat: D.wds},
      {k: "outcome", cat: [...new Set(RUNS.map(r => r.outcome || "none"))].sort()},
      {k: "alpha_early"}, {k: "best_val_ce"}, {k: "r_squared"}, {k: "knee_epoch"},
    ].filter(a => a.cat || RUNS.some(r => finite(r[a.k])));
    const w = Math.max(760, 130 * axes.length), h = 330, top = 34, bottom = h - 26;
    const svg = sv("svg", {"class": "chart", width: w, height: h, "data-chart": "hparams"}, b);
    const xa = i => 60 + i * (w - 120) / Math.max(1, axes.length - 1);
    for (const a of axes) {
      if (a.cat) {
        const n = a.cat.length;
        a.pos = v => { const i = a.cat.indexOf(a.k === "outcome" ? (v || "none") : v);
                       return i < 0 ? bottom + 8 : bottom - (n === 1 ? 0.5 : i / (n - 1)) * (bottom - top); };
        a.ticks = a.cat.map(v => [v, a.pos(v)]);
      } else {
        const [lo, hi] = extent(RUNS.map(r => r[a.k]));
        const s = scale(lo, hi, bottom, top, false);
        a.pos = v => finite(v) ? s(v) : bottom + 8;
        a.ticks = s.ticks().map(t => [t, s(t)]);
      }
    }
    const vals = RUNS.map(r => r.best_val_ce).filter(finite).sort((a, c) => a - c);
    const q = v => { if (!vals.length) return 0.5; let lo = 0, hi = vals.length;
                     while (lo < hi) { const m = (lo + hi) >> 1; if (vals[m] < v) lo = m + 1; else hi = m; }
                     return lo / Math.max(1, vals.length - 1); };
    const colour = t => "hsl(" + Math.round(230 - 230 * Math.min(1, Math.max(0, t))) + ",75%,45%)";
    const g = sv("g", {}, svg);
    const lines = [];
    for (const r of RUNS) {
      const d = axes.map((a, i) => (i ? "L" : "M") + xa(i).toFixed(1) + "," + a.pos(r[a.k]).toFixed(1)).join("");
      const ok = finite(r.best_val_ce) && r.outcome !== "diverged";
      lines.push([r, sv("path", {"class": "pc", d: d, stroke: ok ? colour(q(r.best_val_ce)) : "#888",
        "stroke-dasharray": ok ? null : "3,2", "data-run": r.run_id,
        "data-tip": runTip(r.run_id, axes.map(a => a.k + " " + fmt(r[a.k])).join(", "))}, g)]);
    }
    const filters = {};
    function applyFilters() {
      for (const [r, p] of lines) {
        const keep = axes.every(a => !filters[a.k] || filters[a.k](a.pos(r[a.k])));
        p.classList.toggle("dim", !keep);
      }
    }
    axes.forEach((a, i) => {
      const ax = sv("g", {"class": "axis"}, svg);
      sv("line", {x1: xa(i), x2: xa(i), y1: top, y2: bottom, stroke: "#555"}, ax);
      const lab = sv("text", {x: xa(i), y: top - 14, "text-anchor": "middle", "class": "title",
                              style: "cursor:pointer"}, ax, a.k);
      const mid = (top + bottom) / 2;
      let state = 0;
      lab.addEventListener("click", e => {
        e.stopPropagation();
        state = (state + 1) % 3;
        filters[a.k] = state === 1 ? (y => y <= mid) : state === 2 ? (y => y > mid && y <= bottom) : null;
        lab.textContent = a.k + (state === 1 ? " (upper half)" : state === 2 ? " (lower half)" : "");
        applyFilters();
      });
      for (const [t, y] of a.ticks) {
        sv("line", {x1: xa(i) - 3, x2: xa(i), y1: y, y2: y}, ax);
        sv("text", {x: xa(i) - 5, y: y + 3, "text-anchor": "end"}, ax, fmt(t));
      }
    });
  })();

  // ---------- failures and exclusions ----------
  (function failures() {
    const b = body("failures");
    const F = objects(D.failures);
    el("h3", {}, b, "Cells not materialized (failed, diverged, running, missing)");
    if (F.length) table(b, D.failures.columns, F, {filter: true, runCol: "run_id",
                        render: {run_id: (td, v) => runLink(v, td)}});
    else note(b, "every cell is materialized");
    el("h3", {}, b, "Runs excluded from the hypotheses, with reasons");
    const E = objects(D.excluded);
    if (E.length) table(b, D.excluded.columns, E, {filter: true, runCol: "run_id",
                        render: {run_id: (td, v) => runLink(v, td)}});
    else note(b, "no exclusions");
  })();

  // ---------- the run table ----------
  (function runs() {
    const b = body("runs");
    if (!RUNS.length) { missing(b, "no run has been fitted yet"); return; }
    note(b, "Click a header to sort, type to filter (any column's text: a variant, a seed, 'diverged'), " +
            "click a row for the run's curves.");
    table(b, D.runs.columns, RUNS, {filter: true, runCol: "run_id", cls: "runs", max: 1000,
          placeholder: "filter runs, e.g. adamw or lr0.2"});
  })();

  // ---------- the run panel ----------
  function showRun(id) {
    const r = BYID.get(id), c = COMP_BY.get(id) || {};
    const pb = document.getElementById("panel-body");
    pb.textContent = "";
    panel.hidden = false;
    panel.setAttribute("data-run-shown", id);
    document.querySelectorAll("tr.sel").forEach(t => t.classList.remove("sel"));
    document.querySelectorAll('tr[data-run="' + CSS.escape(id) + '"]').forEach(t => t.classList.add("sel"));
    el("h2", {}, pb, id);
    if (!r) { note(pb, (c.status || "unknown") + ": " + (c.reason || "no fit for this run")); return; }
    const tr = D.train[id], va = D.val[id];
    const xs = [], ys = [];
    for (const s of [tr, va]) if (s) { xs.push(...s[0]); ys.push(...s[1]); }
    if (!xs.length) missing(pb, "no curve data for this run (not published yet)");
    else {
      const legend = el("p", {"class": "legend"}, pb);
      el("span", {style: "color:" + TRAIN}, legend, "\u2501 train loss");
      el("span", {style: "color:" + VAL}, legend, "\u2501 validation loss");
      el("span", {}, legend, "\u2505 power-law fit after burn-in");
      el("span", {}, legend, "\u25bc knee");
      const ch = chart(pb, {w: 560, h: 360, x: extent(xs, true), y: extent(ys, true), xlog: true, ylog: true,
                            kind: "run", xlabel: "step", ylabel: "loss (nats)", title: id});
      if (tr) sv("path", {d: pathD(ch.X, ch.Y, tr[0], tr[1]), fill: "none", stroke: TRAIN, "stroke-width": 1.3,
                          "data-run-curve": "train", "data-tip": runTip(id, "train loss")}, ch.g);
      if (va) sv("path", {d: pathD(ch.X, ch.Y, va[0], va[1]), fill: "none", stroke: VAL, "stroke-width": 1.3,
                          "data-run-curve": "val", "data-tip": runTip(id, "validation loss")}, ch.g);
      if (finite(r.exponent) && finite(r.intercept) && tr) {
        const t0 = finite(r.burn_in_step) ? r.burn_in_step : tr[0][0], t1 = tr[0][tr[0].length - 1];
        const ts = [], fy = [];
        for (let i = 0; i <= 60; i++) {
          const t = t0 * Math.pow(t1 / t0, i / 60);
          ts.push(t); fy.push(Math.exp(r.intercept) * Math.pow(t, r.exponent));
        }
        sv("path", {d: pathD(ch.X, ch.Y, ts, fy), fill: "none", stroke: "#000", "stroke-width": 1.5,
                    "stroke-dasharray": "5,3", "data-run-curve": "fit",
                    "data-tip": runTip(id, "fit: L = " + fmt(Math.exp(r.intercept)) + " t^" + fmt(r.exponent) +
                                           ", R\u00b2 " + fmt(r.r_squared))}, ch.g);
      }
      if (finite(r.burn_in_step) && finite(r.burn_in_loss)) {
        const x = ch.X(r.burn_in_step), y = ch.Y(r.burn_in_loss);
        sv("path", {d: "M" + (x - 6) + "," + (y - 11) + "h12l-6,10z", fill: "#ffb300", stroke: "#000",
                    "data-run-curve": "knee",
                    "data-tip": runTip(id, "knee: epoch " + fmt(r.knee_epoch) + ", step " + fmt(r.burn_in_step) +
                                           ", loss " + fmt(r.burn_in_loss))}, ch.svg);
      }
    }
    const t = el("table", {}, pb);
    const tb = el("tbody", {}, t);
    for (const k of D.runs.columns) {
      const row = el("tr", {}, tb);
      el("th", {"class": "l"}, row, k);
      el("td", {}, row, fmt(r[k]));
    }
    if (c.status) {
      const row = el("tr", {}, tb);
      el("th", {"class": "l"}, row, "status");
      el("td", {}, row, c.status + (c.reason && c.reason !== "ok" ? ": " + c.reason : ""));
    }
  }
  document.body.setAttribute("data-ready", "1");
})();
