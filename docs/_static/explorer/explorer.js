/* The site's explorer: each exit's prediction and Grad-CAM maps for a fixed selection of test images,
   read from data.js (made by tools/build_site_explorer.py). Nothing is fetched and no model runs here:
   a map is upsampled bilinearly to the image's size, scaled to [0, 1] and blended over the image, as
   gradcam.normalize and viz.overlay do in the notebooks. */
(function () {
  "use strict";

  const RIGHT = "#2ca02c", WRONG = "#d62728";
  const root = document.getElementById("explorer");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const D = window.EXPLORER_DATA;
  // ms since the navigation began (the data parsed, the first PNG of images decoded, the first picture drawn),
  // and each redraw's ms
  const times = (window.explorerTimes = { dataParsed: performance.now(), imagesDecoded: null, firstPicture: null,
                                          redraws: [] });
  if (!D || D.format !== 2) {
    $("ex-title").textContent = D ? "The explorer's data is of another format: run python tools/build_site_explorer.py."
      : "The explorer's data (_static/explorer/data.js) did not load: rebuild the site.";
    return;
  }

  const n = D.label.length, E = D.exits, S = D.size, M = D.map_size, MM = M * M;

  function bytes(base64) {
    const s = atob(base64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const maps = bytes(D.maps), jet = bytes(D.jet);

  // Which exits are right, each image's difficulty k/E, and where each wrong answer's true-class map sits.
  const right = new Uint8Array(n * E), difficulty = new Uint8Array(n), trueAt = new Int32Array(n * E);
  let wrongCount = 0;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < E; k++) {
      const ok = D.predicted[i * E + k] === D.label[i];
      right[i * E + k] = ok;
      difficulty[i] += ok;
      if (!ok) trueAt[i * E + k] = wrongCount++;
    }
  }
  const perMethod = n * E * MM + wrongCount * MM;

  /* The 8x8 bytes of image i's map at exit k (0-based) for its own prediction or the true class. */
  function rawMap(i, k, method, target) {
    const base = D.methods.findIndex((m) => m[0] === method) * perMethod;
    const at = target === "true" && !right[i * E + k] ? base + n * E * MM + trueAt[i * E + k] * MM : base + (i * E + k) * MM;
    return maps.subarray(at, at + MM);
  }

  // Bilinear upsampling M -> S with half-pixel centres, clamped at the edges: torch's align_corners=False.
  const lo = new Int32Array(S), hi = new Int32Array(S), frac = new Float32Array(S);
  for (let x = 0; x < S; x++) {
    const src = Math.max(((x + 0.5) * M) / S - 0.5, 0);
    lo[x] = Math.floor(src);
    hi[x] = Math.min(lo[x] + 1, M - 1);
    frac[x] = src - lo[x];
  }

  /* A map as the notebooks show it: S x S, scaled to [0, 1] (an all-equal map is 0). */
  function heat(q) {
    const out = new Float32Array(S * S);
    let min = Infinity, max = -Infinity;
    for (let y = 0; y < S; y++) {
      const r0 = lo[y] * M, r1 = hi[y] * M, fy = frac[y];
      for (let x = 0; x < S; x++) {
        const fx = frac[x];
        const top = q[r0 + lo[x]] * (1 - fx) + q[r0 + hi[x]] * fx;
        const bottom = q[r1 + lo[x]] * (1 - fx) + q[r1 + hi[x]] * fx;
        const v = top * (1 - fy) + bottom * fy;
        out[y * S + x] = v;
        if (v < min) min = v;
        if (v > max) max = v;
      }
    }
    for (let p = 0; p < S * S; p++) out[p] = max > min ? (out[p] - min) / (max - min) : 0;
    return out;
  }

  // The images come in PNGs of D.images_per_png, each decoded once (by the browser, off the main thread) into
  // RGBA pixels: first the one that holds the image to show, then the others in turn.
  const perPng = D.images_per_png, pngs = D.images.map(() => null), decoding = D.images.map(() => null);

  function decode(c) {
    if (!decoding[c]) {
      decoding[c] = createImageBitmap(new Blob([bytes(D.images[c])], { type: "image/png" })).then((png) => {
        const canvas = document.createElement("canvas");
        canvas.width = png.width;
        canvas.height = png.height;
        const ctx = canvas.getContext("2d", { willReadFrequently: true });
        ctx.drawImage(png, 0, 0);
        pngs[c] = { pixels: ctx.getImageData(0, 0, png.width, png.height).data, columns: png.width / S };
      });
    }
    return decoding[c];
  }

  function paint(canvas, i, cam, alpha) {
    const ctx = canvas.getContext("2d"), out = ctx.createImageData(S, S), px = out.data;
    const { pixels: atlas, columns } = pngs[Math.floor(i / perPng)], j = i % perPng;
    const row0 = Math.floor(j / columns) * S, col0 = (j % columns) * S, width = columns * S;
    for (let y = 0; y < S; y++) {
      for (let x = 0; x < S; x++) {
        const p = y * S + x, a = ((row0 + y) * width + col0 + x) * 4, o = p * 4;
        const c = cam ? Math.min(255, Math.floor(cam[p] * 256)) * 3 : 0, w = cam ? alpha : 0;
        for (let ch = 0; ch < 3; ch++) px[o + ch] = Math.round((1 - w) * atlas[a + ch] + w * jet[c + ch]);
        px[o + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
  }

  // ------------------------------------------------------------------ controls

  const state = { klass: "all", difficulty: "any", correct: "any", exit: E, target: "predicted", method: D.methods[0][0],
                  alpha: 0.5, position: 0 };
  let passing = [];

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    select.appendChild(o);
  }
  D.classes.forEach((c, j) => option($("ex-class"), String(j), c));
  for (let k = 0; k <= E; k++) option($("ex-difficulty"), String(k), `${k}/${E}`);
  $("ex-exit").max = String(E);
  $("ex-exit").value = String(E);
  const methods = $("ex-methods");
  D.methods.forEach(([key, title], j) => {
    const label = document.createElement("label"), input = document.createElement("input");
    input.type = "radio";
    input.name = "ex-method";
    input.value = key;
    input.checked = j === 0;
    label.append(input, " " + title);
    methods.appendChild(label);
  });
  const strip = $("ex-strip"), tiles = [];
  for (let k = 0; k < E; k++) {
    const tile = document.createElement("button"), canvas = document.createElement("canvas"), caption = document.createElement("span");
    tile.type = "button";
    tile.className = "ex-tile";
    canvas.width = canvas.height = S;
    caption.className = "ex-tile-caption";
    tile.append(canvas, caption);
    tile.addEventListener("click", () => { $("ex-exit").value = String(k + 1); onExit(); });
    strip.appendChild(tile);
    tiles.push({ tile, canvas, caption });
  }
  $("ex-selection").textContent = `The images: ${D.selection}.`;

  function passes(i) {
    return (state.klass === "all" || D.label[i] === Number(state.klass)) &&
      (state.difficulty === "any" || difficulty[i] === Number(state.difficulty)) &&
      (state.correct === "any" || right[i * E + state.exit - 1] === (state.correct === "right" ? 1 : 0));
  }

  function refilter() {
    const shown = passing.length ? passing[state.position] : -1;
    passing = [];
    for (let i = 0; i < n; i++) if (passes(i)) passing.push(i);
    const still = passing.indexOf(shown);
    state.position = still >= 0 ? still : Math.min(state.position, Math.max(passing.length - 1, 0));
    const slider = $("ex-image");
    slider.max = String(Math.max(passing.length, 1));
    slider.value = String(state.position + 1);
    slider.disabled = $("ex-prev").disabled = $("ex-next").disabled = passing.length <= 1;
  }

  const name = (j) => D.classes[j];
  const capital = (s) => s.charAt(0).toUpperCase() + s.slice(1);
  const percent = (i, k) => `${Math.round(D.confidence[i * E + k] / 10)}%`;

  function draw() {
    const start = performance.now();
    const count = $("ex-count");
    if (!passing.length) {
      count.textContent = `no image of ${n.toLocaleString("en")} passes these filters`;
      $("ex-title").textContent = "No image passes these filters: loosen one of them.";
      $("ex-explains").textContent = "";
      root.classList.add("ex-empty");
      return;
    }
    root.classList.remove("ex-empty");
    const i = passing[state.position], k = state.exit - 1, label = D.label[i], said = D.predicted[i * E + k];
    const ok = right[i * E + k];
    count.textContent = `image ${state.position + 1} of ${passing.length.toLocaleString("en")} that pass the filters ` +
      `(of ${n.toLocaleString("en")}; test image ${D.index[i]})`;
    const title = $("ex-title");
    title.innerHTML = "";
    const b = document.createElement("b"), verdict = document.createElement("span");
    b.textContent = `${capital(name(label))} (${difficulty[i]}/${E})`;
    verdict.textContent = `${name(said)} (${percent(i, k)}) ${ok ? "✓" : "✗"}`;
    verdict.style.color = ok ? RIGHT : WRONG;
    title.append(b, ` — B${state.exit} says `, verdict);
    const explained = state.target === "true" ? label : said;
    const why = state.target === "true" ? "the true class" : `B${state.exit}'s own prediction`;
    const methodTitle = D.methods.find((m) => m[0] === state.method)[1];
    $("ex-explains").innerHTML = "";
    const what = document.createElement("b");
    what.textContent = name(explained);
    $("ex-explains").append(`${methodTitle} shows where B${state.exit} looked for `, what,
                            ` (${why}); each map is scaled to its own maximum.`);
    $("ex-overlay-caption").textContent = `${methodTitle}, B${state.exit}`;
    // What is shown, for tests and scripts: the image (its place in data.js), exit, target, method, opacity.
    Object.assign(root.dataset, { image: String(i), exit: String(state.exit), target: state.target,
                                  method: state.method, alpha: String(state.alpha) });
    if (!pngs[Math.floor(i / perPng)]) {  // its PNG is still being decoded: the pictures follow when it is
      decode(Math.floor(i / perPng)).then(draw);
      return;
    }
    paint($("ex-image-canvas"), i, null, 0);
    for (let j = 0; j < E; j++) {
      const cam = heat(rawMap(i, j, state.method, state.target));
      if (j === k) paint($("ex-overlay"), i, cam, state.alpha);
      const t = tiles[j], good = right[i * E + j];
      paint(t.canvas, i, cam, state.alpha);
      t.caption.textContent = `B${j + 1} ${good ? "✓" : "✗"} ${name(D.predicted[i * E + j])} ${percent(i, j)}`;
      t.tile.style.setProperty("--ex-colour", good ? RIGHT : WRONG);
      t.tile.setAttribute("aria-pressed", String(j === k));
      t.tile.setAttribute("aria-label", `exit B${j + 1}: ${name(D.predicted[i * E + j])}, ${percent(i, j)}, ` +
                          `${good ? "right" : "wrong"}`);
    }
    const took = performance.now() - start;
    if (times.firstPicture === null) times.firstPicture = performance.now();
    times.redraws.push(took);
    root.dataset.drawn = String(times.redraws.length);  // how many pictures have been drawn
  }

  function onFilter() {
    state.klass = $("ex-class").value;
    state.difficulty = $("ex-difficulty").value;
    state.correct = $("ex-correct").value;
    refilter();
    draw();
  }

  function onExit() {
    state.exit = Number($("ex-exit").value);
    $("ex-exit-value").textContent = `B${state.exit}`;
    if (state.correct !== "any") refilter();
    draw();
  }

  function onImage(position) {
    state.position = Math.max(0, Math.min(passing.length - 1, position));
    $("ex-image").value = String(state.position + 1);
    draw();
  }

  function onView() {
    state.target = root.querySelector("input[name=ex-target]:checked").value;
    state.method = root.querySelector("input[name=ex-method]:checked").value;
    state.alpha = Number($("ex-alpha").value);
    $("ex-alpha-value").textContent = state.alpha.toFixed(2);
    draw();
  }

  function start() {
    for (const id of ["ex-class", "ex-difficulty", "ex-correct"]) $(id).addEventListener("change", onFilter);
    $("ex-exit").addEventListener("input", onExit);
    $("ex-image").addEventListener("input", () => onImage(Number($("ex-image").value) - 1));
    $("ex-prev").addEventListener("click", () => onImage(state.position - 1));
    $("ex-next").addEventListener("click", () => onImage(state.position + 1));
    root.querySelectorAll("input[name=ex-target], input[name=ex-method]").forEach((r) => r.addEventListener("change", onView));
    $("ex-alpha").addEventListener("input", onView);
    // The first picture, with the controls as they stand (a reload may keep a browser's earlier choices).
    state.klass = $("ex-class").value;
    state.difficulty = $("ex-difficulty").value;
    state.correct = $("ex-correct").value;
    state.exit = Number($("ex-exit").value);
    $("ex-exit-value").textContent = `B${state.exit}`;
    state.target = root.querySelector("input[name=ex-target]:checked").value;
    state.method = root.querySelector("input[name=ex-method]:checked").value;
    state.alpha = Number($("ex-alpha").value);
    $("ex-alpha-value").textContent = state.alpha.toFixed(2);
    refilter();
    state.position = Number($("ex-image").value) - 1;
    onImage(state.position);
    root.dataset.ready = "yes";
  }

  decode(0).then(() => {
    times.imagesDecoded = performance.now();
    start();
    D.images.reduce((previous, _, c) => previous.then(() => decode(c)), Promise.resolve());  // the rest, in turn
  }, () => { $("ex-title").textContent = "The explorer's images could not be decoded: rebuild the site."; });
})();
