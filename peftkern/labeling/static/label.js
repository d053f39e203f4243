// The labelling page: fetches one item at a time from /api/next and POSTs each label at once
// (/api/label, /api/flag, /api/skip); the server stores it before answering, so closing the tab
// loses nothing that was sent. Text is always inserted as text (never as HTML).
"use strict";
let item = null;        // {id, task, prompt, answers, labels, scale}
let order = [];         // ranking: answer positions in the order clicked (best first)
let ratings = [];       // rating: one value per answer shown (0 = not yet)
let busy = false;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function call(method, url, body) {
  const options = {method, headers: {"Content-Type": "application/json"}, credentials: "same-origin"};
  if (body !== undefined) options.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + "); your earlier labels are saved");
  }
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((data && data.error) || ("HTTP " + response.status));
  return data;
}

function showProgress(p) {
  const total = p.done + p.left;
  const share = total ? Math.round(100 * p.done / total) : 100;
  const box = $("progress");
  box.textContent = "";
  box.appendChild(el("span", {id: "progress-text"},
    `You: ${p.done} labelled, ${p.left} left. All raters: ${p.complete} of ${p.items} items complete ` +
    `(${p.raters_per_item} rater${p.raters_per_item > 1 ? "s" : ""} each).`));
  const bar = el("div", {class: "bar"});
  const fill = el("div", {style: `width:${share}%`});
  bar.appendChild(fill);
  box.appendChild(bar);
}

async function loadNext() {
  $("error").textContent = "";
  const data = await call("GET", "/api/next");
  showProgress(data.progress);
  item = data.item;
  if (!item) {
    $("item").hidden = true;
    $("done").hidden = false;
    return;
  }
  $("done").hidden = true;
  render();
}

function render() {
  $("item").hidden = false;
  $("item").dataset.itemId = item.id;
  $("task").textContent = item.task === "pairwise" ? "Which answer is better?" :
    item.task === "ranking" ? "Rank the answers, best first" : `Rate each answer from 1 (bad) to ${item.scale} (good)`;
  $("prompt").textContent = item.prompt;
  $("reason").value = "";
  order = [];
  ratings = item.answers.map(() => 0);
  const answers = $("answers");
  answers.textContent = "";
  item.answers.forEach((text, j) => {
    const card = el("div", {class: "answer", id: `answer-${j}`, "data-position": j});
    const head = el("h4");
    const key = item.task === "pairwise" ? item.labels[j] : String(j + 1);
    head.appendChild(el("span", {}, `Answer ${item.task === "pairwise" ? item.labels[j] : j + 1}`));
    head.appendChild(el("kbd", {}, key.toLowerCase()));
    card.appendChild(head);
    card.appendChild(el("pre", {class: "answer-text"}, text));
    if (item.task === "ranking") {
      const row = el("div");
      row.appendChild(el("span", {}, "rank "));
      const input = el("input", {class: "rank-input", id: `rank-${j}`, type: "number", min: 1, max: item.answers.length});
      input.addEventListener("click", (e) => e.stopPropagation());
      input.addEventListener("change", () => fromInputs());
      row.appendChild(input);
      card.appendChild(row);
      card.addEventListener("click", () => pick(j));
    } else if (item.task === "rating") {
      const row = el("div", {class: "likert"});
      for (let v = 1; v <= item.scale; v++) {
        const label = el("label");
        const input = el("input", {type: "radio", name: `rating-${j}`, id: `rating-${j}-${v}`, value: v});
        input.addEventListener("change", () => { ratings[j] = v; refreshRatings(); });
        label.appendChild(input);
        label.appendChild(el("span", {}, String(v)));
        row.appendChild(label);
      }
      card.appendChild(row);
    }
    answers.appendChild(card);
  });
  const controls = $("controls");
  controls.textContent = "";
  if (item.task === "pairwise") {
    for (const [choice, text, key] of [["A", "A is better", "a"], ["B", "B is better", "b"], ["tie", "Tie", "t"],
                                        ["both_bad", "Both bad", "x"]]) {
      const b = el("button", {type: "button", id: `choice-${choice}`, class: "primary"});
      b.appendChild(document.createTextNode(text + " "));
      b.appendChild(el("kbd", {}, key));
      b.addEventListener("click", () => submit({kind: "pairwise", choice}));
      controls.appendChild(b);
    }
    $("keys").textContent = "Keys: a / b: that answer is better, t: tie, x: both bad, f: flag, s: skip; Esc leaves the reason box.";
  } else {
    const reset = el("button", {type: "button", id: "reset"}, "Clear (r)");
    reset.addEventListener("click", () => { order = []; ratings = item.answers.map(() => 0); refresh(); });
    const send = el("button", {type: "button", id: "submit", class: "primary"}, "Submit (Enter)");
    send.addEventListener("click", () => submitList());
    controls.appendChild(reset);
    controls.appendChild(send);
    $("keys").textContent = item.task === "ranking" ?
      "Keys: press the answers' numbers (or click them) from best to worst, or type ranks; r: clear, Enter: submit, f: flag, s: skip." :
      `Keys: 1-${item.scale} rates the next unrated answer; r: clear, Enter: submit, f: flag, s: skip.`;
  }
  refresh();
}

function pick(j) {
  if (order.includes(j)) order = order.filter((x) => x !== j);
  else order.push(j);
  refresh();
}

function fromInputs() {
  const ranks = item.answers.map((_, j) => parseInt($(`rank-${j}`).value, 10));
  order = item.answers.map((_, j) => j).filter((j) => ranks[j] > 0).sort((x, y) => ranks[x] - ranks[y]);
  refresh(false);
}

function refresh(writeInputs = true) {
  if (item.task === "ranking") {
    item.answers.forEach((_, j) => {
      const at = order.indexOf(j);
      $(`answer-${j}`).classList.toggle("picked", at >= 0);
      if (writeInputs) $(`rank-${j}`).value = at >= 0 ? at + 1 : "";
    });
  } else if (item.task === "rating") {
    refreshRatings();
  }
}

function refreshRatings() {
  item.answers.forEach((_, j) => {
    $(`answer-${j}`).classList.toggle("picked", ratings[j] > 0);
    for (let v = 1; v <= item.scale; v++) $(`rating-${j}-${v}`).checked = ratings[j] === v;
  });
}

function submitList() {
  if (item.task === "ranking") {
    const ranks = item.answers.map((_, j) => parseInt($(`rank-${j}`).value, 10));
    if (ranks.some((r) => !(r > 0))) {
      $("error").textContent = "give every answer a rank (click them from best to worst, or type the numbers)";
      return;
    }
    submit({kind: "ranking", ranks});
  } else {
    if (ratings.some((r) => r === 0)) {
      $("error").textContent = "rate every answer first";
      return;
    }
    submit({kind: "rating", ratings});
  }
}

async function post(url, body) {
  if (busy || !item) return;
  busy = true;
  $("error").textContent = "";
  try {
    await call("POST", url, Object.assign({item_id: item.id, reason: $("reason").value}, body));
    $("status").textContent = "saved";
    await loadNext();
  } catch (e) {
    $("error").textContent = "not saved: " + e.message;
  } finally {
    busy = false;
  }
}

const submit = (body) => post("/api/label", body);

document.addEventListener("keydown", (e) => {
  if (!item || e.altKey || e.metaKey) return;
  const typing = ["TEXTAREA", "INPUT"].includes(document.activeElement.tagName);
  if (e.key === "Escape" && typing) { document.activeElement.blur(); return; }
  if (e.key === "Enter" && (!typing || e.ctrlKey || document.activeElement.classList.contains("rank-input"))) {
    if (item.task !== "pairwise") { e.preventDefault(); submitList(); }
    return;
  }
  if (typing || e.ctrlKey) return;
  const key = e.key.toLowerCase();
  if (key === "f") { post("/api/flag", {}); return; }
  if (key === "s") { post("/api/skip", {}); return; }
  if (item.task === "pairwise") {
    const choice = {a: "A", b: "B", t: "tie", x: "both_bad"}[key];
    if (choice) submit({kind: "pairwise", choice});
  } else if (key === "r") {
    order = []; ratings = item.answers.map(() => 0); refresh();
  } else if (/^[1-9]$/.test(key)) {
    const n = parseInt(key, 10);
    if (item.task === "ranking" && n <= item.answers.length) pick(n - 1);
    if (item.task === "rating" && n <= item.scale) {
      const j = ratings.indexOf(0);
      if (j >= 0) { ratings[j] = n; refreshRatings(); }
    }
  }
});

$("flag").addEventListener("click", () => post("/api/flag", {}));
$("skip").addEventListener("click", () => post("/api/skip", {}));
loadNext().catch((e) => { $("error").textContent = e.message; });
