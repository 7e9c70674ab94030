// The upload page, enhanced: several films at once, drag and drop, upload progress, a table
// with a CSV download, and a heat map of where the model looked. Without JavaScript the form
// still posts one film to "/" and the server renders the answer.
//
// Every answer comes from the JSON API the page shares with programs (/api/predict and
// /api/explain); an error is shown in the API's own words. Each film is sent with the site
// named in the form. A reader who signs in with their token (kept in this tab's
// sessionStorage only) gets a label control on each answered row (POST /api/feedback).
"use strict";

(() => {
  const form = document.getElementById("upload");
  const input = document.getElementById("file");
  const errorBox = document.getElementById("error");
  const results = document.getElementById("results");
  const tbody = results.querySelector("tbody");
  const summary = document.getElementById("summary");
  const csvLink = document.getElementById("csv");
  const rowTemplate = document.getElementById("row-template");
  const mapTemplate = document.getElementById("map-template");
  const submitButton = form.querySelector("button[type=submit]");
  const siteInput = document.getElementById("site");
  const reader = document.getElementById("reader");
  const readerForm = document.getElementById("reader-form");
  const readerToken = document.getElementById("reader-token");
  const readerStatus = document.getElementById("reader-status");
  const signOut = document.getElementById("reader-sign-out");
  const maxFiles = Number(form.dataset.maxFiles);
  const maxBytes = Number(form.dataset.maxBytes);
  const PARALLEL = 2; // uploads in flight: one per server core is plenty
  const RETRIES = 3; // a 503 "busy" answer is retried after its Retry-After

  const entries = []; // one per film of the current set: {file, row, answer, error, label}
  let running = 0; // sets being classified (a new set may start while one runs)
  const TOKEN_KEY = "hm-mlflow-reader-token";
  const SITE_KEY = "hm-mlflow-site";
  let readerName = null; // the signed-in reader, once the server has confirmed the token

  // The enhancement: several files, a drop zone, and the JavaScript-only hints.
  input.multiple = true;
  for (const element of document.querySelectorAll(".js-only")) element.hidden = false;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  function percent(value) {
    return `${(value * 100).toFixed(1)}%`;
  }

  function answerCell(cell, label) {
    cell.className = `answer answer-${label.toLowerCase()}`;
    cell.replaceChildren();
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.setAttribute("aria-hidden", "true");
    const text = document.createElement("span");
    text.className = "label-text";
    text.textContent = label;
    cell.append(mark, text);
  }

  function probabilityCell(cell, probability, threshold) {
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(probability);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute(
      "aria-label",
      `Probability ${percent(probability)}; the model answers PNEUMONIA from ${percent(threshold)}`,
    );
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = percent(probability);
    const cut = document.createElement("span");
    cut.className = "cut";
    cut.style.left = percent(threshold);
    cut.title = `decision threshold ${percent(threshold)}`;
    bar.append(fill, cut);
    cell.replaceChildren(value, bar);
  }

  function setStatus(entry, text, progress) {
    entry.row.querySelector(".status").textContent = text;
    const bar = entry.row.querySelector("progress");
    bar.hidden = progress === null;
    if (progress !== null) bar.value = progress;
  }

  // One request to the API with upload progress; resolves to {status, body, retryAfter}.
  function post(url, file, onProgress) {
    return new Promise((resolve) => {
      const request = new XMLHttpRequest();
      request.open("POST", url);
      request.responseType = "json";
      request.upload.onprogress = (event) => {
        if (event.lengthComputable) onProgress(Math.round((100 * event.loaded) / event.total));
      };
      request.upload.onload = () => onProgress(100);
      request.onload = () =>
        resolve({
          status: request.status,
          body: request.response,
          retryAfter: Number(request.getResponseHeader("Retry-After")) || 1,
        });
      request.onerror = () => resolve({ status: 0, body: null, retryAfter: 1 });
      const data = new FormData();
      data.append("file", file, file.name);
      data.append("site", siteInput.value.trim() || "default");
      request.send(data);
    });
  }

  function message(response) {
    if (response.status === 0) return "The server could not be reached; check the connection and try again.";
    if (response.body && typeof response.body.detail === "string") return response.body.detail;
    return `The server answered with status ${response.status}; try again.`;
  }

  const sleep = (seconds) => new Promise((done) => setTimeout(done, seconds * 1000));

  // POST, retrying a "busy" 503 after the time the server asks for.
  async function ask(url, entry, what) {
    for (let attempt = 0; ; attempt += 1) {
      const response = await post(url, entry.file, (done) =>
        setStatus(entry, done < 100 ? `uploading ${done}%` : what, done < 100 ? done : null),
      );
      const busy = response.status === 503 && response.body && /busy/.test(response.body.detail || "");
      if (!busy || attempt >= RETRIES) return response;
      setStatus(entry, `server busy, trying again in ${response.retryAfter} s`, null);
      await sleep(response.retryAfter);
    }
  }

  function addRow(file) {
    const row = rowTemplate.content.firstElementChild.cloneNode(true);
    row.querySelector(".filename").textContent = file.name;
    tbody.append(row);
    const entry = { file, row, answer: null, error: null, label: null };
    setStatus(entry, "waiting", 0);
    return entry;
  }

  function fillRow(entry) {
    const { row, answer, error } = entry;
    setStatus(entry, "", null);
    if (error) {
      const cell = row.querySelector(".answer");
      cell.className = "answer row-error";
      cell.textContent = error;
      row.classList.add("failed");
      return;
    }
    const image = document.createElement("img");
    image.src = answer.thumbnail;
    image.alt = `${entry.file.name}, as the model cropped it`;
    row.querySelector(".thumb").replaceChildren(image);
    answerCell(row.querySelector(".answer"), answer.label);
    probabilityCell(row.querySelector(".probability"), answer.probability, answer.threshold);
    row.querySelector(".version").textContent = answer.model.version;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary explain";
    button.textContent = "Where did it look?";
    button.setAttribute("aria-label", `Where did the model look in ${entry.file.name}?`);
    button.addEventListener("click", () => explain(entry, button));
    row.querySelector(".actions").replaceChildren(button);
    labelControl(entry);
  }

  // --- readers' labels ------------------------------------------------------------------

  function labelControl(entry) {
    const cell = entry.row.querySelector(".reader-label");
    cell.hidden = readerName === null;
    if (readerName === null || !entry.answer || !entry.answer.prediction_id) {
      cell.replaceChildren();
      return;
    }
    const group = document.createElement("div");
    group.className = "labels";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", `Reader's label for ${entry.file.name}`);
    const status = document.createElement("span");
    status.className = "label-status";
    status.setAttribute("aria-live", "polite");
    for (const label of ["NORMAL", "PNEUMONIA"]) {
      const choice = document.createElement("button");
      choice.type = "button";
      choice.className = "secondary";
      choice.textContent = label;
      choice.dataset.label = label;
      choice.setAttribute("aria-pressed", String(entry.label === label));
      choice.addEventListener("click", () => sendLabel(entry, label, group, status));
      group.append(choice);
    }
    if (entry.label) status.textContent = `Labelled ${entry.label}`;
    cell.replaceChildren(group, status);
  }

  async function sendLabel(entry, label, group, status) {
    status.textContent = "saving…";
    let response;
    try {
      response = await fetch("/api/feedback", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`,
        },
        body: JSON.stringify({ prediction_id: entry.answer.prediction_id, label }),
      });
    } catch {
      status.textContent = "The server could not be reached; the label was not saved.";
      return;
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      status.textContent = (body && body.detail) || `Not saved (status ${response.status}).`;
      if (response.status === 401) setReader(null, body && body.detail);
      return;
    }
    entry.label = label;
    for (const choice of group.querySelectorAll("button")) {
      choice.setAttribute("aria-pressed", String(choice.dataset.label === label));
    }
    status.textContent = `Labelled ${label} by ${body.reviewer}`;
    updateSummary();
  }

  function setReader(name, note) {
    readerName = name;
    signOut.hidden = name === null;
    if (name === null) sessionStorage.removeItem(TOKEN_KEY);
    readerStatus.textContent = name === null ? note || "" : `Signed in as ${name}: label each answer below.`;
    for (const header of document.querySelectorAll(".reader-column")) header.hidden = name === null;
    for (const entry of entries) labelControl(entry);
  }

  async function signIn(token) {
    const response = await fetch("/api/reviewer", { headers: { Authorization: `Bearer ${token}` } })
      .catch(() => null);
    const body = response ? await response.json().catch(() => null) : null;
    if (response && response.ok) {
      sessionStorage.setItem(TOKEN_KEY, token);
      setReader(body.reviewer);
      return;
    }
    setReader(null, (body && body.detail) || "The server could not be reached; try again.");
  }

  reader.hidden = false;
  readerForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = readerToken.value.trim();
    readerToken.value = "";
    if (token) signIn(token);
  });
  signOut.addEventListener("click", () => setReader(null, "Signed out."));
  if (sessionStorage.getItem(TOKEN_KEY)) signIn(sessionStorage.getItem(TOKEN_KEY));
  siteInput.value = localStorage.getItem(SITE_KEY) || siteInput.value;
  siteInput.addEventListener("change", () => localStorage.setItem(SITE_KEY, siteInput.value.trim()));

  async function classify(entry) {
    const response = await ask("/api/predict?thumbnail=true", entry, "classifying");
    if (response.status === 200) entry.answer = response.body;
    else entry.error = message(response);
    fillRow(entry);
    updateSummary();
  }

  async function explain(entry, button) {
    const existing = entry.row.nextElementSibling;
    if (existing && existing.classList.contains("map-row")) {
      existing.remove(); // a second click hides the map
      button.textContent = "Where did it look?";
      button.setAttribute("aria-expanded", "false");
      return;
    }
    button.disabled = true;
    button.textContent = "Making the heat map…";
    const response = await ask("/api/explain", entry, "making the heat map");
    setStatus(entry, "", null);
    button.disabled = false;
    if (response.status !== 200) {
      button.textContent = "Where did it look?";
      setStatus(entry, message(response), null);
      return;
    }
    const mapRow = mapTemplate.content.firstElementChild.cloneNode(true);
    const image = mapRow.querySelector("img");
    image.src = `data:image/png;base64,${response.body.overlay_png}`;
    image.alt = `Heat map over ${entry.file.name}: regions that move the probability of pneumonia`;
    mapRow.querySelector(".caption").textContent =
      `${response.body.caption} Model version ${response.body.model.version}.`;
    entry.row.after(mapRow);
    button.textContent = "Hide the heat map";
    button.setAttribute("aria-expanded", "true");
  }

  function csvField(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function updateSummary() {
    const done = entries.filter((e) => e.answer || e.error);
    const failed = done.filter((e) => e.error).length;
    summary.textContent =
      `${done.length} of ${entries.length} films answered` + (failed ? `, ${failed} could not be read` : "");
    document.getElementById("threshold-note").hidden = !done.some((e) => e.answer);
    const lines = [["file", "label", "probability", "threshold", "model", "model_version",
                    "site", "prediction_id", "reader_label", "error"]];
    for (const { file, answer, error, label } of done) {
      lines.push(
        answer
          ? [file.name, answer.label, answer.probability.toFixed(6), answer.threshold.toFixed(6),
             answer.model.name, answer.model.version, answer.site, answer.prediction_id || "",
             label || "", ""]
          : [file.name, "", "", "", "", "", "", "", "", error],
      );
    }
    const csv = lines.map((line) => line.map(csvField).join(",")).join("\r\n") + "\r\n";
    if (csvLink.href.startsWith("blob:")) URL.revokeObjectURL(csvLink.href);
    csvLink.href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
    csvLink.setAttribute("aria-disabled", done.length ? "false" : "true");
  }

  async function classifyAll(fileList) {
    const files = Array.from(fileList || []);
    showError("");
    if (!files.length) {
      showError("No file was chosen: pick or drop one or more chest X-rays.");
      return;
    }
    if (files.length > maxFiles) {
      showError(`${files.length} files were chosen; the page takes up to ${maxFiles} at once. Choose fewer.`);
      return;
    }
    entries.length = 0;
    tbody.replaceChildren();
    results.hidden = false;
    for (const file of files) entries.push(addRow(file));
    for (const entry of entries) {
      if (entry.file.size > maxBytes) {
        entry.error = `The file is ${(entry.file.size / 2 ** 20).toFixed(1)} MB; the largest accepted is ${(maxBytes / 2 ** 20).toFixed(0)} MB.`;
        fillRow(entry);
      }
    }
    updateSummary();
    running += 1;
    submitButton.disabled = true;
    const queue = entries.filter((e) => !e.error);
    const workers = Array.from({ length: Math.min(PARALLEL, queue.length) }, async () => {
      while (queue.length) await classify(queue.shift());
    });
    await Promise.all(workers);
    running -= 1;
    submitButton.disabled = running > 0;
    if (entries.length === 1 && entries[0].error) showError(entries[0].error);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    classifyAll(input.files);
  });

  // Drag and drop anywhere on the page.
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) document.body.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    if (event.dataTransfer && event.dataTransfer.files.length) classifyAll(event.dataTransfer.files);
  });
})();
