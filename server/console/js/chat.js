// The operator's chat: pick a model and profile, ask with photos, watch the answer stream,
// stop it (aborting the fetch closes the connection, which cancels the request on the
// server), and read what the answer cost under it.

import { apiFetch, errorMessage, getJSON, spanOf, traceId, Unauthorized } from "./api.js";
import { el, energyText, num } from "./format.js";
import { photoDataURL } from "./images.js";

const $ = (id) => document.getElementById(id);

let history = [];
let photos = [];
let controller = null;
let models = [];

export async function loadModels() {
  const list = await getJSON("/v1/models");
  models = list.data;
  const select = $("model-select");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => el("option", {
    value: m.id, textContent: m.id + (m.meta?.vision ? " (vision)" : ""),
  })));
  const preferred = models.find((m) => m.id === previous) || models.find((m) => m.meta?.default) || models[0];
  if (preferred) select.value = preferred.id;
}

async function addPhotos(files) {
  for (const file of files) {
    try {
      const photo = await photoDataURL(file);
      photos.push(photo);
      $("attachments").append(el("img", { src: photo.url, alt: file.name, title: `${photo.width}×${photo.height}` }));
    } catch (err) {
      $("chat-error").textContent = `${file.name}: not an image this browser can read`;
    }
  }
}

function userContent(text, images) {
  if (!images.length) return text;
  return [{ type: "text", text }, ...images.map((p) => ({ type: "image_url", image_url: { url: p.url } }))];
}

export function timingsText(timings) {
  if (!timings) return "";
  const parts = [`TTFT ${num(timings.ttft_ms)} ms`, `${num(timings.decode_tokens_per_s, 1)} tok/s`,
    `${timings.prompt_tokens} prompt + ${timings.completion_tokens} answer tokens`];
  if (timings.images?.length) {
    const before = timings.images.reduce((s, im) => s + im.tokens_before, 0);
    const after = timings.images.reduce((s, im) => s + im.tokens_after, 0);
    parts.push(`image tokens ${before} → ${after}`);
  }
  return parts.join(" · ");
}

// Reads the SSE stream, appending text as it comes; returns the final chunk's timings.
async function readStream(response, answer) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let timings = null;
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) answer.textContent += choice.delta.content;
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (chunk.timings) timings = chunk.timings;
      }
    }
  }
  return { timings, finish };
}

function busy(on) {
  $("chat-send").disabled = on;
  $("chat-stop").disabled = !on;
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text && !photos.length) return;
  $("chat-error").textContent = "";
  const images = photos;
  photos = [];
  $("attachments").replaceChildren();
  $("chat-input").value = "";
  const message = { role: "user", content: userContent(text, images) };
  const body = {
    model: $("model-select").value, messages: [...history, message], stream: true,
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  if ($("profile-select").value) body.edgevlm = { profile: $("profile-select").value };

  const answer = el("div", { class: "answer", "data-testid": "chat-answer" });
  const timingsRow = el("div", { class: "timings", "data-testid": "chat-timings" });
  const turn = el("div", { class: "turn" },
    el("div", { class: "question", textContent: text }, ...images.map((p) => el("img", { src: p.url, alt: "photo" }))),
    answer, timingsRow);
  $("chat-log").append(turn);
  turn.scrollIntoView({ block: "end" });

  controller = new AbortController();
  busy(true);
  let response = null;
  try {
    response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const { timings, finish } = await readStream(response, answer);
    history = [...body.messages, { role: "assistant", content: answer.textContent }];
    timingsRow.textContent = timingsText(timings) + (finish === "length" ? " · cut at max tokens" : "");
    timingsRow.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      answer.classList.add("stopped");
      timingsRow.textContent = "stopped";
      timingsRow.dataset.state = "stopped";
    } else if (!(err instanceof Unauthorized)) {
      answer.classList.add("failed");
      timingsRow.textContent = err.message;
      timingsRow.dataset.state = "failed";
    }
  } finally {
    busy(false);
    controller = null;
  }
  const trace = response && traceId(response);
  if (trace) {
    const span = await spanOf(trace).catch(() => null);
    const energy = span ? energyText(span) : "energy: trace file off";
    timingsRow.append(el("span", { class: "energy", "data-testid": "chat-energy", textContent: ` · ${energy}` }));
    timingsRow.dataset.trace = trace;
  }
}

export function setupChat() {
  $("chat-form").addEventListener("submit", send);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => controller?.abort());
  $("chat-new").addEventListener("click", () => {
    history = [];
    $("chat-log").replaceChildren();
  });
  for (const id of ["image-input", "camera-input"]) {
    $(id).addEventListener("change", async (e) => {
      await addPhotos([...e.target.files]);
      e.target.value = "";
    });
  }
}
