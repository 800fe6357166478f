// Start-up: ask for an API key when the server wants one, then show the chat or dashboard tab.

import { apiKey, setApiKey, Unauthorized, whenUnauthorized } from "./api.js";
import { loadModels, setupChat } from "./chat.js";
import { setupDashboard, startDashboard, stopDashboard } from "./dashboard.js";

const $ = (id) => document.getElementById(id);

function askForKey(message) {
  stopDashboard();
  $("app").hidden = true;
  $("key-panel").hidden = false;
  $("key-error").textContent = apiKey() ? message : "";
  setApiKey("");
  $("key-input").focus();
}

async function start() {
  try {
    await loadModels();
  } catch (err) {
    if (err instanceof Unauthorized) return;
    $("chat-error").textContent = `Cannot list models: ${err.message}`;
  }
  $("key-panel").hidden = true;
  $("app").hidden = false;
  if (!$("dashboard").hidden) startDashboard();
}

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("chat").hidden = name !== "chat";
  $("dashboard").hidden = name !== "dashboard";
  if (name === "dashboard") startDashboard();
  else stopDashboard();
}

whenUnauthorized(askForKey);
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey($("key-input").value.trim());
  $("key-input").value = "";
  start();
});
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
setupChat();
setupDashboard();
start();
