// The customer page: reads the customer token from the URL fragment (never sent to a server),
// calls this origin's /v1 API with it and shows the organization's usage and credits.
"use strict";

(function () {
  const numbers = new Intl.NumberFormat();
  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const dayAndTime = new Intl.DateTimeFormat(undefined, {
    weekday: "long", day: "numeric", month: "long", hour: "2-digit", minute: "2-digit",
  });
  const day = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "long", year: "numeric" });
  const DAY_MS = 86400000;

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function setNumber(id, value) {
    const node = $(id);
    node.dataset.value = String(value);
    node.textContent = numbers.format(value);
  }

  // "in 12 days", "in 5 hours", "3 minutes ago".
  function fromNow(date) {
    const ms = date.getTime() - Date.now();
    const abs = Math.abs(ms);
    if (abs >= 2 * DAY_MS) return relative.format(Math.round(ms / DAY_MS), "day");
    if (abs >= 3600000) return relative.format(Math.round(ms / 3600000), "hour");
    return relative.format(Math.round(ms / 60000), "minute");
  }

  function claimsOf(token) {
    const part = token.split(".")[1] || "";
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    return JSON.parse(json);
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function notice(title, text) {
    $("notice-title").textContent = title;
    $("notice-text").textContent = text;
    show($("notice"), true);
    show($("content"), false);
    show($("loading"), false);
  }

  function linkInvalid(message) {
    const revoked = /revoked/i.test(message || "");
    notice(revoked ? "This link was revoked" : "This link has expired",
      "For your security, links to this page stop working after a while. Open the page again " +
      "from the app you came from to get a fresh link.");
  }

  function start() {
    const token = new URLSearchParams(location.hash.slice(1)).get("token");
    if (!token) {
      notice("No access link", "Open this page from the app you use: it adds the link that " +
        "shows your usage and credits.");
      return;
    }
    let claims;
    try {
      claims = claimsOf(token);
    } catch (error) {
      notice("This link is not valid", "Open the page again from the app you came from.");
      return;
    }
    if (typeof claims.exp !== "number" || claims.exp * 1000 <= Date.now()) {
      linkInvalid("");
      return;
    }
    const org = String(claims.sub);
    const scopes = String(claims.scope || "").split(" ");
    const base = "v1/orgs/" + encodeURIComponent(org) + "/";

    async function call(method, path, body) {
      const init = { method, headers: { Authorization: "Bearer " + token } };
      if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      if (method === "POST") init.headers["Idempotency-Key"] = newKey();
      const response = await fetch(base + path, init);
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        const error = answer.error || {};
        throw new ApiError(response.status, error.code || "", error.message || response.statusText);
      }
      return answer;
    }

    function failed(error) {
      if (error instanceof ApiError && error.status === 401) {
        linkInvalid(error.message);
        return true;
      }
      return false;
    }

    // The page stops at the token's expiry rather than failing on the next click.
    setTimeout(() => linkInvalid(""), Math.min(claims.exp * 1000 - Date.now(), 2147483647));
    $("org-line").textContent = "Organization " + org;
    load(call, scopes).catch((error) => {
      if (!failed(error)) {
        notice("Something went wrong", "The page could not load your data (" + error.message +
          "). Try again in a moment.");
      }
    });
    wirePurchases(call, scopes, failed);
  }

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return "portal-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function load(call, scopes) {
    const holds = call("GET", "holds").catch((error) => {
      if (error instanceof ApiError && error.status === 404) return { holds: [] };
      throw error;
    });
    const [meter, quota, balance, subscription, ledger, held] = await Promise.all([
      call("GET", "meter"), call("GET", "quota"), call("GET", "balance"),
      call("GET", "subscription"), call("GET", "ledger?limit=50"), holds,
    ]);
    showWeek(meter, quota, subscription);
    showExtras(meter, quota, balance, held);
    showLots(balance.lots);
    showActivity(ledger.entries);
    if (scopes.includes("purchase")) showBuy(subscription);
    show($("loading"), false);
    show($("content"), true);
  }

  function planName(planId) {
    return planId ? planId.charAt(0).toUpperCase() + planId.slice(1) + " plan" : "Plan";
  }

  function nextWeekStart() {
    const now = new Date();
    const daysToMonday = (8 - now.getUTCDay()) % 7 || 7;
    return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() + daysToMonday));
  }

  function showWeek(meter, quota, subscription) {
    const status = subscription.status;
    $("plan-badge").textContent = planName(meter.plan_id) +
      (status && status !== "none" && status !== "active" ? " · " + status.replace(/_/g, " ") : "");
    setNumber("used", meter.used);
    const fill = $("usage-fill");
    const bar = $("usage-bar");
    if (meter.quota > 0) {
      const percent = Math.min(100, Math.round((meter.used / meter.quota) * 100));
      $("quota-line").textContent = "of " + numbers.format(meter.quota) + " units in your plan";
      $("quota-line").dataset.value = String(meter.quota);
      fill.style.width = percent + "%";
      bar.setAttribute("aria-valuenow", String(percent));
      bar.setAttribute("aria-valuetext", percent + "% of the week's plan units used");
      bar.classList.toggle("over", meter.used >= meter.quota);
      bar.classList.toggle("near", meter.used < meter.quota && percent >= 80);
      $("usage-note").textContent = meter.used >= meter.quota
        ? "The plan's units for this week are used up: further usage comes from your extras."
        : numbers.format(meter.quota - meter.used) + " plan units left this week.";
    } else {
      $("quota-line").textContent = "units used this week";
      $("quota-line").dataset.value = "0";
      show(bar, false);
      $("usage-note").textContent =
        "Your plan includes no weekly units: all usage is paid from your extras.";
    }
    const reset = nextWeekStart();
    $("reset-line").textContent = "The week resets " + fromNow(reset) + ", on " +
      dayAndTime.format(reset) + ".";
    const gate = $("gate-line");
    if (!quota.allowed) {
      gate.textContent = quota.reason === "PAYMENT_PAST_DUE"
        ? "Usage is paused: a payment is past due. Update your payment details to continue."
        : "Usage is paused: the plan's units and your extras are used up. Buy a pack to continue.";
      gate.classList.add("warn");
      show(gate, true);
    }
  }

  function showExtras(meter, quota, balance, holds) {
    const heldUnits = typeof meter.held === "number" ? meter.held
      : (holds.holds || []).reduce((sum, hold) => sum + hold.units, 0);
    setNumber("balance", balance.balance);
    setNumber("held", heldUnits);
    setNumber("remaining", Math.max(0, quota.remaining));
    if (balance.balance < 0) {
      $("debt-line").textContent = "You have used " + numbers.format(-balance.balance) +
        " units more than you had. They are taken from your next purchase, or from next " +
        "week's plan units.";
      show($("debt-line"), true);
    }
  }

  const LOT_KINDS = {
    topup: "Purchased pack", grant: "Free credits", adjustment: "Credit from support",
    reinstatement: "Returned after a dispute", settlement: "Settled usage",
  };

  function showLots(lots) {
    const list = $("lots");
    list.replaceChildren();
    const sorted = lots.slice().sort((a, b) => {
      if (a.expires_at === b.expires_at) return 0;
      if (!a.expires_at) return 1;
      if (!b.expires_at) return -1;
      return new Date(a.expires_at) - new Date(b.expires_at);
    });
    for (const lot of sorted) {
      const item = el("li", "lot");
      item.dataset.lotId = lot.id;
      const head = el("div", "lot-head");
      head.append(el("span", "lot-kind", LOT_KINDS[lot.kind] || lot.kind));
      const left = el("span", "lot-left");
      const units = el("strong", "lot-remaining", numbers.format(lot.remaining));
      units.dataset.value = String(lot.remaining);
      left.append(units, " of " + numbers.format(lot.units) + " units left");
      head.append(left);
      const expiry = el("div", "lot-expiry muted");
      if (lot.expires_at) {
        const when = new Date(lot.expires_at);
        const soon = when.getTime() - Date.now() < 14 * DAY_MS;
        expiry.textContent = (when.getTime() < Date.now() ? "Expired " : "Expires ") +
          fromNow(when) + " (" + day.format(when) + ")";
        if (soon) expiry.classList.add("soon");
      } else {
        expiry.textContent = "Never expires";
      }
      const meterBar = el("div", "lot-bar");
      const meterFill = el("div", "lot-fill");
      meterFill.style.width = (lot.units > 0 ? Math.round((lot.remaining / lot.units) * 100) : 0) + "%";
      meterBar.append(meterFill);
      item.append(head, meterBar, expiry);
      list.append(item);
    }
    show($("no-lots"), sorted.length === 0);
  }

  function describe(entry) {
    const n = numbers.format(Math.abs(entry.amount));
    switch (entry.kind) {
      case "topup": return "Bought " + n + " units";
      case "grant": return "Received " + n + " free units";
      case "adjustment": return entry.amount >= 0
        ? "Support added " + n + " units" : "Support removed " + n + " units";
      case "reinstatement": return n + " units returned after a payment dispute";
      case "settlement": return n + " units of extra usage covered by this week's plan";
      case "debit": return "Used " + n + " units beyond the plan";
      case "refund": return "Refund: " + n + " units taken back";
      case "dispute": return "Payment disputed: " + n + " units withdrawn";
      case "expiration": return n + " unused units expired";
      default: return entry.kind + ": " + entry.amount + " units";
    }
  }

  // Consecutive usage debits of one day read as one line.
  function grouped(entries) {
    const rows = [];
    for (const entry of entries) {
      const last = rows[rows.length - 1];
      const sameDay = last && new Date(last.created_at).toDateString() ===
        new Date(entry.created_at).toDateString();
      if (entry.kind === "debit" && last && last.kind === "debit" && sameDay) {
        last.amount += entry.amount;
        last.count += 1;
      } else {
        rows.push({ kind: entry.kind, amount: entry.amount, created_at: entry.created_at, count: 1 });
      }
    }
    return rows;
  }

  function showActivity(entries) {
    const list = $("activity");
    list.replaceChildren();
    for (const row of grouped(entries).slice(0, 12)) {
      const item = el("li", row.amount >= 0 ? "credit" : "debit");
      const text = describe(row) + (row.count > 1 ? " (" + row.count + " runs)" : "");
      item.append(el("span", "what", text), el("span", "when muted", fromNow(new Date(row.created_at))));
      list.append(item);
    }
    show($("no-activity"), entries.length === 0);
  }

  function packs() {
    const block = document.getElementById("packs");
    return block ? JSON.parse(block.textContent) : [];
  }

  function money(cents, currency) {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: currency.toUpperCase() })
      .format(cents / 100);
  }

  function showBuy(subscription) {
    const list = $("packs-list");
    list.replaceChildren();
    for (const pack of packs()) {
      const form = el("form", "pack");
      form.dataset.packId = pack.id;
      const info = el("div", "pack-info");
      info.append(el("strong", "", numbers.format(pack.units) + " units"),
        el("span", "muted", money(pack.price_cents, pack.currency) + " each · " +
          (pack.expiry_days ? "valid " + pack.expiry_days + " days" : "never expire")));
      const field = el("div", "quantity");
      const inputId = "quantity-" + pack.id;
      const label = el("label", "", "Quantity");
      label.htmlFor = inputId;
      const input = el("input");
      Object.assign(input, { id: inputId, type: "number", min: "1", max: "100", value: "1",
        name: "quantity", inputMode: "numeric", required: true });
      field.append(label, input);
      const button = el("button", "primary", "Buy");
      button.type = "submit";
      button.setAttribute("aria-label", "Buy " + numbers.format(pack.units) + " units");
      form.append(info, field, button);
      list.append(form);
    }
    show($("manage"), Boolean(subscription.stripe_customer_id));
    show($("buy"), true);
  }

  function go(url) {
    const target = new URL(url);
    if (target.protocol !== "https:" && target.protocol !== "http:") {
      throw new Error("unexpected address " + target.protocol);
    }
    if (window.top !== window.self) {
      try {
        window.top.location.assign(target.href);
        return;
      } catch (error) {
        window.open(target.href, "_blank", "noopener");
        return;
      }
    }
    location.assign(target.href);
  }

  function wirePurchases(call, scopes, failed) {
    if (!scopes.includes("purchase")) return;
    const problem = $("buy-error");
    async function run(button, request) {
      show(problem, false);
      button.disabled = true;
      try {
        go((await request()).url);
      } catch (error) {
        if (!failed(error)) {
          problem.textContent = error.code === "NO_CUSTOMER"
            ? "There are no payment details to manage yet."
            : "That did not work: " + error.message;
          show(problem, true);
        }
        button.disabled = false;
      }
    }
    $("packs-list").addEventListener("submit", (event) => {
      event.preventDefault();
      const form = event.target;
      const quantity = Number(form.elements.quantity.value);
      if (!Number.isInteger(quantity) || quantity < 1 || quantity > 100) {
        form.elements.quantity.reportValidity();
        return;
      }
      run(form.querySelector("button"),
        () => call("POST", "checkout", { pack_id: form.dataset.packId, quantity }));
    });
    $("manage-button").addEventListener("click", (event) =>
      run(event.currentTarget, () => call("POST", "billing-portal", {})));
  }

  document.addEventListener("DOMContentLoaded", start);
})();
