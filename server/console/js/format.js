// Number formatting shared by the chat's timings row and the dashboard.

export function num(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits);
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child);
  return node;
}

export function energyText(span) {
  if (!span) return null;
  const a = span.attributes || {};
  if (a["edgevlm.energy.joules"] === undefined) return "energy: off";
  const measured = a["edgevlm.energy.measured"] === false ? " estimated" : "";
  return `${num(a["edgevlm.energy.joules"], 2)} J${measured} (${a["edgevlm.energy.source"]})`;
}
