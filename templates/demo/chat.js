// Sluice's chat page: streams answers from POST /api/chat (SSE over fetch), shows the quota from GET /api/quota, and
// keeps the conversation on the server through SluiceChats (chats.js). Inlined by demo/chat.html, so this file must
// not contain Django template tags. Prompts are only ever set as text; answers go through SluiceMarkdown
// (markdown.js), which builds elements from a fixed set and puts all of the model's text in text nodes. There is no
// innerHTML here.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const form = $("composer"), prompt = $("prompt"), model = $("model"), maxTokens = $("max-tokens");
  const send = $("send"), stop = $("stop"), newChat = $("new-chat"), transcript = $("transcript"), status = $("status");
  const undo = $("undo"), banner = $("banner"), bannerText = $("banner-text"), bannerWait = $("banner-wait");
  const title = $("conversation-title"), lengthHint = $("length-hint"), lengthText = $("length-text");
  const csrfToken = form.elements.csrfmiddlewaretoken.value;
  const maxBodyBytes = Number($("chat").dataset.maxBodyBytes) || 0;
  // What "Continue" asks, unseen: the answer that stopped at its max tokens goes on in a new answer below it.
  const CONTINUE_PROMPT = "Continue exactly where your previous answer stopped, without repeating anything.";
  const LONG_SHARE = 0.8;  // of the body limit: past this, the page suggests a new chat
  const encoder = new TextEncoder();

  let plan = null;  // the last /api/quota answer
  let controller = null;  // the answer streaming now
  // The conversation on the page: its messages are the history sent with each question.
  let conversation = { id: null, title: "", messages: [] };
  let historyBytes = 0;  // the history's size in a request body
  let previousId = null;  // the conversation "New chat" left, for Undo
  let waitUntil = 0, waitTimer = null, waitMessage = "";  // a rate limit's countdown
  // A window's "used" counts the leases of answers not settled yet: just after an answer it may read as spent for a
  // moment. So "spent" holds Send back only when confirmed: on load, by a quota refusal, or still so SETTLE_MS later.
  const SETTLE_MS = 1500;
  let spentSeenAt = 0, spentConfirmed = false;
  const chats = SluiceChats({
    csrfToken, refusal, say, current: () => conversation.id, open: openConversation,
    renamed(id, title) {
      if (conversation.id !== id) return;
      conversation.title = title;
      showTitle();
    },
    deleted(id) {
      if (conversation.id === id) startNew();
      if (previousId === id) { previousId = null; undo.hidden = true; }
    },
  });

  // ---- Formatting --------------------------------------------------------------------------------------------------

  const number = (n) => Number(n).toLocaleString();

  function inTime(seconds) {
    seconds = Math.max(1, Math.ceil(seconds));
    if (seconds < 90) return `${seconds} second${seconds === 1 ? "" : "s"}`;
    const minutes = Math.round(seconds / 60);
    if (minutes < 90) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours} h ${minutes % 60} min`;
    return `${Math.round(hours / 24)} days`;
  }

  function resetText(window) {
    const at = new Date(window.resets_at);
    const sameDay = at.toDateString() === new Date().toDateString();
    const when = sameDay ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : at.toLocaleString([], { weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });
    return `Resets in ${inTime(window.reset_seconds)} (${when})`;
  }

  const tokens = (n) => `${number(n)} token${n === 1 ? "" : "s"}`;

  // Money comes as exact decimal strings of plan.currency (JSON numbers would round them). Intl formats the string
  // itself, not a float of it, with the currency's own decimals (2 for USD) and up to 6 (a cheap answer costs
  // fractions of a cent), truncated: what is left is never shown as more than it is.
  const moneyFormats = new Map();
  function moneyFormat(currency) {
    if (!moneyFormats.has(currency)) {
      let digits = 2;
      try {
        digits = new Intl.NumberFormat(undefined, { style: "currency", currency }).resolvedOptions().minimumFractionDigits;
      } catch { /* not a currency Intl knows: 2 decimals */ }
      moneyFormats.set(currency, new Intl.NumberFormat(undefined, {
        minimumFractionDigits: digits, maximumFractionDigits: Math.max(digits, 6), roundingMode: "trunc" }));
    }
    return moneyFormats.get(currency);
  }

  // An amount without its currency: "3.75"; a negative one (a limit lowered mid-period) as 0; one too small for 6
  // decimals as "< 0.000001", never as 0 — something is still there.
  function amount(value) {
    const format = moneyFormat(plan.currency);
    const n = Number(value);
    if (!(n > 0)) return format.format(0);
    return n < 1e-6 ? `< ${format.format("0.000001")}` : format.format(value);
  }

  const money = (value) => `${amount(value)} ${plan.currency}`;

  // A window's colour from its share used: amber from 80 %, red from 95 %.
  const level = (share) => share >= 0.95 ? "critical" : share >= 0.8 ? "warn" : "ok";

  // ---- The quota meter, the plan's controls and the banner ---------------------------------------------------------

  function showWindow(scope, window) {
    $(`${scope}-meter`).max = Math.max(1, window.limit);
    $(`${scope}-meter`).value = Math.min(window.used, window.limit);
    $(`${scope}-used`).textContent = number(window.used);
    $(`${scope}-limit`).textContent = number(window.limit);
    $(`${scope}-left`).textContent = number(window.remaining);
    $(`${scope}-reset`).textContent = resetText(window);
    $(`${scope}-window`).dataset.level = level(window.limit > 0 ? window.used / window.limit : 1);
  }

  // A budget's meter, in money: hidden while the plan sets no budget for the period (a later answer may drop it).
  function showBudget(period, window) {
    const box = $(`budget-${period}-window`);
    box.hidden = !window;
    if (!window) return;
    const limit = Number(window.limit), used = Number(window.used);
    const share = limit > 0 ? used / limit : 1;
    $(`budget-${period}-meter`).value = Math.min(1, share);  // max is 1: the share, not the amounts
    $(`budget-${period}-used`).textContent = amount(window.used);
    $(`budget-${period}-limit`).textContent = amount(window.limit);
    $(`budget-${period}-left`).textContent = amount(window.remaining);
    box.querySelector(".currency").textContent = plan.currency;
    $(`budget-${period}-reset`).textContent = resetText(window);
    box.dataset.level = level(share);
  }

  const PERIODS = [["day", "today's"], ["month", "this month's"]];

  // The windows the page meters, in one shape for the note, the banner and the refusals: the token windows, then
  // the budgets the plan sets. `what` names one in a sentence ("today's tokens", "this month's budget"); `left` says
  // what is left of it ("9 tokens", "0.80 USD").
  function meteredWindows() {
    if (!plan) return [];
    const found = PERIODS.map(([period, name]) => {
      const w = plan.tokens[period];
      return { period, money: false, what: `${name} tokens`, window: w, limit: w.limit, used: w.used,
               remaining: w.remaining, left: tokens(w.remaining) };
    });
    for (const [period, name] of PERIODS) {
      const w = plan.budget && plan.budget[period];
      if (w) {
        found.push({ period, money: true, what: `${name} budget`, window: w, limit: Number(w.limit),
                     used: Number(w.used), remaining: Number(w.remaining), left: money(w.remaining) });
      }
    }
    return found;
  }

  // A warning before a window runs out (80 % used or more, something left): of the token windows and the budgets,
  // the one with the smallest share left; how much is left, when it resets. A spent window is the banner's
  // (showBanner), not this note's.
  function showNearLimit() {
    const near = meteredWindows()
      .filter((w) => w.limit > 0 && w.remaining > 0 && w.used / w.limit >= 0.8)
      .sort((a, b) => a.remaining / a.limit - b.remaining / b.limit)[0];
    const note = $("near-limit");
    note.hidden = !near;
    if (near) {
      note.textContent = `You have used ${Math.floor((near.used / near.limit) * 100)} % of ${near.what}: `
        + `${near.left} left. ${resetText(near.window)}.`;
    }
  }

  function showPlan(quota) {
    const chosen = model.value;
    model.replaceChildren(...quota.models.map((name) => new Option(name, name, false, name === chosen)));
    maxTokens.max = quota.max_tokens_per_request;
    if (!maxTokens.value || Number(maxTokens.value) > quota.max_tokens_per_request) {
      maxTokens.value = Math.min(1024, quota.max_tokens_per_request);
    }
    $("max-tokens-hint").textContent = `(up to ${number(quota.max_tokens_per_request)})`;
    if (!quota.models.length) say("Your plan has no models available. Contact the operator.");
  }

  // confirm: the figures come from the page's load or a quota refusal, so a spent window is spent.
  async function refreshQuota({ confirm = false } = {}) {
    let response;
    try {
      response = await fetch("/api/quota", { headers: { Accept: "application/json" }, credentials: "same-origin" });
    } catch {
      return plan;  // offline: keep the last figures
    }
    if (!response.ok) {
      if (!plan) say((await refusal(response)).message);
      return plan;
    }
    plan = await response.json();
    showWindow("day", plan.tokens.day);
    showWindow("month", plan.tokens.month);
    for (const [period] of PERIODS) showBudget(period, plan.budget && plan.budget[period]);
    showNearLimit();
    const requests = plan.requests;
    $("requests-left").textContent = requests.remaining == null ? ""
      : `${number(requests.remaining)} of ${number(requests.limit_per_minute)} requests left this minute`;
    if ([...model.options].map((option) => option.value).join() !== plan.models.join()) showPlan(plan);
    noteSpent(confirm);
    setBusy(Boolean(controller));
    return plan;
  }

  function noteSpent(confirm) {
    if (!spentWindow()) {
      spentSeenAt = 0;
      spentConfirmed = false;
    } else if (confirm || (spentSeenAt && Date.now() - spentSeenAt >= SETTLE_MS)) {
      spentConfirmed = true;
    } else if (!spentSeenAt) {
      spentSeenAt = Date.now();
      setTimeout(refreshQuota, SETTLE_MS);  // look again once the last answer's lease has settled
    }
  }

  // Of `windows`, the one that resets last (nothing can be sent before it does).
  const lastToReset = (windows) => windows.sort((a, b) => b.window.reset_seconds - a.window.reset_seconds)[0] || null;

  // A window with nothing left, tokens or money: of those, the one that resets last.
  function spentWindow() {
    return lastToReset(meteredWindows().filter((w) => w.remaining <= 0));
  }

  // What a spent window says after "you've": "used all of today's tokens", "spent all of today's budget (5.00 USD)".
  function spentText(spent) {
    return spent.money ? `spent all of ${spent.what} (${money(spent.window.limit)})` : `used all of ${spent.what}`;
  }

  // Why Send is held, if it is: a suspension, a spent quota or a rate limit's countdown (one banner, never a pile).
  function showBanner() {
    let text = "", wait = "";
    const spent = spentConfirmed && spentWindow();
    if (plan && plan.suspended) {
      text = explain("account_suspended");
    } else if (spent) {
      const until = spent.money ? "it resets" : "they reset";
      text = `You've ${spentText(spent)}, so you can't send until ${until}. ${resetText(spent.window)}.`;
    } else if (waitUntil > Date.now()) {
      text = waitMessage;
      wait = `Try again in ${inTime((waitUntil - Date.now()) / 1000)}.`;
    }
    if (bannerText.textContent !== text) bannerText.textContent = text;  // role=alert: announced when it changes
    bannerWait.textContent = wait;  // the countdown is not announced each second
    banner.hidden = !text;
    banner.dataset.kind = wait ? "wait" : "blocked";
    return Boolean(text);
  }

  function holdUntil(retryAfterSeconds, message) {
    waitUntil = Date.now() + Math.max(1, retryAfterSeconds) * 1000;
    waitMessage = message;
    clearInterval(waitTimer);
    waitTimer = setInterval(() => {
      if (Date.now() >= waitUntil) {
        clearInterval(waitTimer);
        waitTimer = null;
        say("You can send again.");
        refreshQuota();
      }
      setBusy(Boolean(controller));
    }, 1000);
    setBusy(Boolean(controller));
  }

  // ---- Human messages for every refusal ----------------------------------------------------------------------------

  // The budget a refusal's message names ("You exceeded your daily budget (USD)."): "day", "month" or null.
  function namedBudget(serverMessage) {
    const named = /\b(daily|monthly) budget\b/.exec(serverMessage || "");
    return named && (named[1] === "daily" ? "day" : "month");
  }

  // The window that refused: the budget the server's message names, or without a message that names a window a
  // spent budget (the one that resets last); otherwise the token window with the fewest tokens left.
  function tightestWindow(serverMessage) {
    const windows = meteredWindows();
    if (!windows.length) return null;
    const budgets = windows.filter((w) => w.money), named = namedBudget(serverMessage);
    if (named) return budgets.find((w) => w.period === named) || null;  // a budget the page no longer knows
    const spent = /token quota/.test(serverMessage || "") ? null : lastToReset(budgets.filter((w) => w.remaining <= 0));
    if (spent) return spent;
    const [day, month] = windows;
    return day.remaining <= month.remaining ? day : month;
  }

  // serverMessage: the refusal's own, which names the window that ran out.
  function quotaMessage(prefix, serverMessage) {
    const tightest = tightestWindow(serverMessage);
    if (!tightest) return `${prefix} your ${namedBudget(serverMessage) ? "budget" : "token quota"} is used up.`;
    const { what, window } = tightest;
    const left = tightest.remaining <= 0 ? `you've ${spentText(tightest)}.`
      : tightest.money ? `only ${tightest.left} of ${what} is left, too few to continue.`
      : `only ${number(window.remaining)} of ${what} are left, too few to continue.`;
    return `${prefix} ${left} ${resetText(window)}.`;
  }

  // code: the OpenAI-style error code; httpStatus and retryAfter when the refusal came as an HTTP response.
  function explain(code, httpStatus, retryAfter, serverMessage) {
    const retry = retryAfter ? ` Try again in ${inTime(retryAfter)}.` : " Try again in a moment.";
    if (code === "rate_limit_exceeded") {
      const limit = plan ? ` (${number(plan.requests.limit_per_minute)} a minute)` : "";
      return `You're sending messages faster than your plan allows${limit}.`;
    }
    if (code === "concurrency_limit_exceeded") {
      const limit = plan ? ` (${plan.concurrent_streams})` : "";
      return `You already have as many answers streaming as your plan allows${limit}, perhaps in another tab. `
        + "Wait for one to finish, then send again.";
    }
    if (code === "insufficient_quota") return quotaMessage("Not sent:", serverMessage);
    if (code === "account_suspended") return "Your account is suspended, so you can't chat right now. Contact the operator.";
    if (code === "not_authenticated" || httpStatus === 401) return "Your session has ended. Sign in again to continue.";
    if (code === "model_not_found") return "That model isn't available on your plan. Pick another one.";
    if (code === "stream_timeout") return "The answer reached the longest time allowed, so it was stopped.";
    if (code === "service_unavailable") return `Sluice's quota service is briefly unavailable.${retry}`;
    if (code === "internal_error") return `Something went wrong on Sluice's side.${retry}`;
    if ((code && code.startsWith("upstream_")) || [500, 502, 503, 504].includes(httpStatus)) {
      return `The model provider is having trouble right now.${retry}`;
    }
    if (httpStatus === 403) return "Your session expired. Reload the page and try again.";
    if (httpStatus >= 400 && httpStatus < 500 && serverMessage) return `Your message couldn't be sent: ${serverMessage}`;
    return `Something went wrong.${retry}`;
  }

  // A refused response → {code, message, retryAfter, serverMessage}.
  async function refusal(response) {
    let error = {};
    if ((response.headers.get("Content-Type") || "").includes("application/json")) {
      try { error = (await response.json()).error || {}; } catch { /* not the JSON we expected */ }
    }
    const retryAfter = Number(response.headers.get("Retry-After")) || 0;
    if (error.code === "insufficient_quota") await refreshQuota({ confirm: true });
    return { code: error.code, retryAfter, serverMessage: error.message,
             message: explain(error.code, response.status, retryAfter, error.message) };
  }

  // ---- The transcript ----------------------------------------------------------------------------------------------

  function say(text) { status.textContent = text; }

  function addTurn(role, modelName) {
    $("empty-state")?.remove();
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const who = document.createElement("p");
    who.className = "who";
    who.textContent = role === "user" ? "You" : modelName;  // the model it was sent to, whatever the picker says now
    const body = document.createElement("div");
    body.className = "text";
    item.append(who, body);
    transcript.append(item);
    return item;
  }

  function userTurn(text) {
    const turn = addTurn("user");
    turn.querySelector(".text").textContent = text;
    return turn;
  }

  // Keeps the end of a growing answer in view, unless the reader has scrolled up to read.
  function follow(element, grow) {
    const root = document.documentElement;
    const atEnd = root.scrollTop + root.clientHeight >= root.scrollHeight - 48;
    grow();
    if (atEnd) element.scrollIntoView({ block: "end" });
  }

  function renderAnswer(turn, text) {
    turn.querySelector(".text").replaceChildren(SluiceMarkdown.render(text));
  }

  function addNotice(turn, text, kind, role = kind === "error" ? "alert" : "status") {
    const notice = document.createElement("p");
    notice.className = `notice ${kind}`;
    if (role) notice.setAttribute("role", role);
    notice.textContent = text;
    turn.append(notice);
    notice.scrollIntoView({ block: "nearest" });
    return notice;
  }

  // The answer's token count, under it: from the stream's usage chunk, or the ledger (once the row has settled).
  function showUsage(turn, usage) {
    turn.querySelector(".meta")?.remove();
    if (!usage || usage.completion_tokens == null) return;
    const meta = document.createElement("p");
    meta.className = "meta";
    meta.textContent = tokens(usage.completion_tokens);
    meta.title = `Answer ${tokens(usage.completion_tokens)}, prompt ${tokens(usage.prompt_tokens)}`;
    turn.querySelector(".text").after(meta);
  }

  // How a finished answer ended, said under it (the page's own words; "length" offers Continue on the last answer).
  const ENDINGS = {
    quota: ["warn", "This answer was cut short by your quota: it could only use the tokens left when it was sent."],
    stopped: ["info", "Stopped."],
    cut: ["error", "The answer was cut short: your quota ran out while it was written."],
    error: ["error", "The answer ended early: the model provider had trouble."],
    interrupted: ["error", "The connection dropped before the answer finished."],
  };

  function offerContinue(turn, limit) {
    const notice = addNotice(turn, limit ? `This answer reached its limit of ${tokens(limit)}. `
      : "This answer reached its token limit. ", "info", null);
    notice.classList.add("continue-offer");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link continue";
    button.textContent = "Continue";
    button.addEventListener("click", () => {
      if (controller || send.disabled) return;
      clearOffers();
      ask(null);
    });
    notice.append(button);
  }

  // Only the newest answer can be continued, and only until something else is sent.
  function clearOffers() {
    transcript.querySelectorAll(".continue-offer").forEach((offer) => offer.remove());
  }

  function showConversation(data) {
    conversation = { id: data.id, title: data.title, messages: [] };
    transcript.replaceChildren();
    data.messages.forEach((message, i) => {
      conversation.messages.push({ ...message, saved: true });
      if (message.role === "user") {
        const turn = userTurn(message.content);
        // Asked, but the page was closed before its answer ended (only the answer's end saves it).
        if (data.messages[i + 1]?.role !== "assistant") addNotice(turn, "No answer was saved for this question.", "info", null);
        return;
      }
      const turn = addTurn("assistant", message.model || "assistant");
      turn.dataset.requestId = message.request_id;
      turn.dataset.state = "saved";
      renderAnswer(turn, message.content);
      showUsage(turn, message.usage);
      if (ENDINGS[message.ending]) addNotice(turn, ENDINGS[message.ending][1], ENDINGS[message.ending][0], null);
    });
    const last = data.messages.at(-1);
    if (last && last.role === "assistant" && last.ending === "length") offerContinue(transcript.lastElementChild);
    if (!data.messages.length) showEmpty();
    historyChanged();
    showTitle();
    transcript.lastElementChild?.scrollIntoView({ block: "end" });
  }

  function showEmpty() {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.id = "empty-state";
    empty.textContent = "Ask anything. The answer appears as it is written.";
    transcript.replaceChildren(empty);
  }

  function showTitle() {
    title.textContent = conversation.title || "New chat";
    document.title = `${conversation.title ? `${conversation.title} · ` : ""}Chat · Sluice`;
    chats.mark(conversation.id);
  }

  // ---- Busy, and the body limit ------------------------------------------------------------------------------------

  function setBusy(busy) {
    prompt.disabled = busy;
    // Locked while an answer streams: the answer is labelled with, and metered for, what it was sent with.
    model.disabled = busy || !plan || !plan.models.length;
    maxTokens.disabled = busy || !plan;
    newChat.disabled = busy;
    stop.disabled = !busy;
    chats.hold(busy);
    const held = showBanner();
    const tooLong = checkLength();
    send.disabled = busy || !plan || !plan.models.length || held || tooLong;
  }

  function historyChanged() {
    historyBytes = encoder.encode(JSON.stringify(conversation.messages.map(({ role, content }) => ({ role, content })))).length;
    checkLength();
  }

  // The next request's body against SLUICE_MAX_BODY_BYTES: a hint from LONG_SHARE of it, Send held past it.
  function checkLength() {
    if (!maxBodyBytes) return false;
    const size = historyBytes + encoder.encode(prompt.value).length + 200;  // 200: the request's other fields
    const share = size / maxBodyBytes;
    lengthHint.hidden = share < LONG_SHARE;
    if (share >= 1) {
      lengthText.textContent = "This chat is too long to send another message (a request carries at most "
        + `${number(Math.floor(maxBodyBytes / 1000))} kB). Start a new chat to go on.`;
    } else if (share >= LONG_SHARE) {
      lengthText.textContent = `This chat is getting long: the next message uses ${Math.floor(share * 100)} % of what `
        + "one request can carry. Start a new chat soon.";
    }
    lengthHint.dataset.level = share >= 1 ? "over" : "near";
    return share >= 1;
  }

  // ---- Streaming an answer -----------------------------------------------------------------------------------------

  // The `data:` payloads of an SSE body, as they arrive.
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data:")) yield line.slice(5).trim();
        }
      }
    }
  }

  // Renders the answer at most once a frame, however fast its tokens come.
  function painter(turn, answer) {
    let pending = false;
    const paint = () => {
      pending = false;
      follow(turn, () => renderAnswer(turn, answer.text));
    };
    return {
      soon() {
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      },
      now: paint,
    };
  }

  // Streams one answer; returns how it ended: {state, message}.
  async function readAnswer(response, turn, answer) {
    const paint = painter(turn, answer);
    try {
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") return { state: "done" };
        const chunk = JSON.parse(data);
        if (chunk.error) {
          if (chunk.error.code !== "insufficient_quota") return { state: "error", message: explain(chunk.error.code, 0, 0) };
          await refreshQuota({ confirm: true });
          return { state: "cut", message: quotaMessage("The answer was cut short:", chunk.error.message) };
        }
        if (chunk.usage) answer.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (!answer.text) turn.querySelector(".thinking")?.remove();
            answer.text += piece;
            paint.soon();
          }
          if (choice.finish_reason) answer.finish = choice.finish_reason;
        }
      }
      return { state: "interrupted", message: "The connection dropped before the answer finished." };
    } finally {
      paint.now();
    }
  }

  // Sends `question` (null: Continue the last answer) with the conversation so far, and streams the answer.
  async function ask(question) {
    const modelName = model.value, requested = Number(maxTokens.value) || undefined;
    const messages = conversation.messages.map(({ role, content }) => ({ role, content }));
    messages.push({ role: "user", content: question ?? CONTINUE_PROMPT });
    clearOffers();
    undo.hidden = true;
    const target = conversation;
    const asked = question !== null ? { role: "user", content: question } : null;
    // A first question starts the conversation on the server at once, so that a reload from now on finds it.
    const first = asked !== null && !target.id && !target.messages.length;
    if (first) save(target, [asked]);
    let askedTurn = null;
    if (asked) {
      // A retry of a refused question replaces it: one copy of the question, however many tries.
      const last = transcript.lastElementChild;
      if (last && last.matches(".turn.user[data-state]") && last.querySelector(".text").textContent === question) last.remove();
      askedTurn = userTurn(question);
    }
    const turn = addTurn("assistant", modelName);
    turn.dataset.state = "waiting";
    turn.setAttribute("aria-busy", "true");
    const thinking = document.createElement("p");
    thinking.className = "thinking";
    thinking.textContent = "Thinking…";
    turn.querySelector(".text").before(thinking);
    turn.scrollIntoView({ block: "end" });
    const answer = { text: "", finish: null, usage: null, started: false, model: modelName, requested };
    controller = new AbortController();
    setBusy(true);
    stop.focus();
    say("Answering…");
    let outcome;
    try {
      const response = await fetch("/api/chat", {
        method: "POST",
        credentials: "same-origin",
        signal: controller.signal,
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", "X-CSRFToken": csrfToken },
        body: JSON.stringify({ model: modelName, messages, max_tokens: requested,
                               stream_options: { include_usage: true } }),
      });
      if (!response.ok) {
        outcome = { state: "refused", ...(await refusal(response)) };
      } else {
        answer.started = true;
        turn.dataset.requestId = response.headers.get("x-request-id") || "";
        turn.dataset.state = "streaming";
        outcome = await readAnswer(response, turn, answer);
      }
    } catch (error) {
      outcome = error.name === "AbortError" ? { state: "stopped", message: "Stopped." }
        : answer.started ? { state: "interrupted", message: "The connection dropped before the answer finished." }
        : { state: "refused", message: "Couldn't reach Sluice. Check your connection and try again." };
    }
    controller = null;
    await settle({ target, first, asked, askedTurn, turn, answer, outcome });
  }

  // Records how the exchange ended: on the answer if one started, otherwise on the question (or in the banner).
  async function settle({ target, first, asked, askedTurn, turn, answer, outcome }) {
    turn.querySelector(".thinking")?.remove();
    turn.removeAttribute("aria-busy");
    let ending = { stopped: "stopped", cut: "cut", error: "error", interrupted: "interrupted" }[outcome.state] || "";
    if (!answer.started) turn.remove();
    if (answer.text) {
      if (outcome.state === "done") ending = finish(turn, answer);
      const message = { role: "assistant", content: answer.text, model: answer.model, ending,
                        request_id: turn.dataset.requestId || "", usage: answer.usage };
      const exchange = asked ? [asked, message] : [message];
      target.messages.push(...exchange);
      historyChanged();
      showUsage(turn, answer.usage);
      save(target, exchange, turn);  // the question too, unless the first question's save has it already
    } else {
      if (asked && !answer.started && !prompt.value) {
        prompt.value = asked.content;  // nothing came back: kept, to send again later (not resent without its answer)
      }
      if (first) {
        // A conversation whose only question got no answer is not kept: the next try starts a new one.
        chats.discard(target);
        conversation = { id: null, title: "", messages: [] };
        setUrl(null);
        showTitle();
      }
    }
    if (outcome.code === "rate_limit_exceeded") {
      // No copy of the question per try: it is back in the box, and the banner counts down.
      askedTurn?.remove();
      if (!transcript.children.length) showEmpty();
      holdUntil(outcome.retryAfter || 1, outcome.message);
    } else if (outcome.message) {
      // A Continue that was refused: said under the answer it would have continued.
      const where = answer.started ? turn : askedTurn || [...transcript.querySelectorAll(".turn.assistant")].at(-1);
      if (where === askedTurn) askedTurn.dataset.state = outcome.state;  // no answer started: "refused" or "stopped"
      if (where) addNotice(where, outcome.message, outcome.state === "stopped" ? "info" : "error");
      else say(outcome.message);
    }
    if (answer.started) turn.dataset.state = outcome.state;
    await refreshQuota();
    // Until the answer's lease settles (a moment after its end) the windows count what it held, which can be well
    // over what it cost: look again then, so that the meters end on what was spent.
    if (answer.started) setTimeout(refreshQuota, SETTLE_MS);
    setBusy(false);
    const day = plan && plan.tokens.day;
    // Refusals and interruptions are announced by their notice (role alert); don't say them twice.
    if (outcome.state === "done") {
      say(ending === "quota" ? "The answer was cut short by your quota."
        : ending === "length" ? "The answer reached its token limit: Continue goes on."
        : day ? `Answer complete. ${number(day.remaining)} tokens left today.` : "Answer complete.");
    } else {
      say("");  // the notice (role alert) or the banner says it
    }
    prompt.focus();
  }

  // A complete answer's ending: "stop", "length" (its max tokens: Continue) or "quota" (its budget was what the
  // quota had left at admission, less than the max tokens asked for).
  function finish(turn, answer) {
    if (answer.finish !== "length") return "stop";
    const produced = answer.usage ? answer.usage.completion_tokens : null;
    if (produced != null && answer.requested && produced < answer.requested) {
      addNotice(turn, ENDINGS.quota[1] + ` It stopped at ${tokens(produced)} of the ${number(answer.requested)} asked for.`,
                "warn", null);
      return "quota";
    }
    offerContinue(turn, answer.requested);
    return "length";
  }

  // ---- Keeping conversations on the server -------------------------------------------------------------------------

  // An exchange is saved once its answer has ended, never from the stream's path (docs/demo.md, "Conversations");
  // a first question as it is sent. `target`: the conversation they belong to (New chat may replace the page's).
  function save(target, messages, turn) {
    const created = !target.id;
    chats.save(target, messages).then((saved) => {
      if (!saved) return;
      if (turn) {
        turn.dataset.saved = "true";
        const usage = saved.at(-1)?.usage;  // from the ledger, once its row has settled
        if (usage && !turn.querySelector(".meta")) showUsage(turn, usage);
      }
      if (target !== conversation) return;
      if (created) setUrl(target.id);
      showTitle();
    });
  }

  function setUrl(id) {
    const url = new URL(location.href);
    if (id) url.searchParams.set("c", id); else url.searchParams.delete("c");
    history.replaceState(null, "", url);
  }

  async function openConversation(id) {
    if (controller) return;
    await chats.saved();
    let data;
    try {
      data = await chats.request("GET", `/api/conversations/${id}`);
    } catch (error) {
      say(error.status === 404 ? "That chat no longer exists." : `Couldn't open the chat: ${error.message}`);
      setUrl(null);
      return;
    }
    undo.hidden = true;
    previousId = null;
    showConversation(data);
    setUrl(data.id);
    chats.fold();
    prompt.focus();
  }

  function startNew() {
    conversation = { id: null, title: "", messages: [] };
    showEmpty();
    historyChanged();
    showTitle();
    setUrl(null);
  }

  // ---- Wiring ------------------------------------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = prompt.value.trim();
    if (!question || controller || send.disabled) return;
    prompt.value = "";
    ask(question);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  prompt.addEventListener("input", () => setBusy(Boolean(controller)));
  stop.addEventListener("click", () => controller && controller.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller) controller.abort();
  });
  const leave = async () => {
    if (controller) return;
    await chats.saved();  // the last answer's save gives the conversation its id, for Undo
    previousId = conversation.messages.length ? conversation.id : null;
    startNew();
    undo.hidden = !previousId;
    say(previousId ? "New chat started. The last one is in your chats." : "New chat started.");
    prompt.focus();
  };
  newChat.addEventListener("click", leave);
  $("length-new-chat").addEventListener("click", leave);
  undo.addEventListener("click", async () => {
    if (previousId) await openConversation(previousId);
    say("Back to your last chat.");
  });
  transcript.addEventListener("click", async (event) => {
    const copy = event.target.closest(".code-block .copy");
    if (!copy) return;
    const code = copy.closest(".code-block").querySelector("code").textContent;
    try {
      await navigator.clipboard.writeText(code);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 2000);
  });

  // scrollIntoView must not put the newest text under the sticky composer.
  new ResizeObserver(() => {
    document.documentElement.style.scrollPaddingBottom = `${form.offsetHeight + 16}px`;
  }).observe(form);

  prompt.focus();
  refreshQuota({ confirm: true });
  chats.refresh();
  const opened = new URLSearchParams(location.search).get("c");
  if (/^\d+$/.test(opened || "")) openConversation(Number(opened)); else historyChanged();
})();
