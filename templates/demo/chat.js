// Sluice's chat page: streams answers from POST /api/chat (SSE over fetch) and shows the quota
// from GET /api/quota. Inlined by demo/chat.html, so this file must not contain Django template tags.
// Model output and prompts are only ever set as text (text nodes), never as HTML.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const form = $("composer"), prompt = $("prompt"), model = $("model"), maxTokens = $("max-tokens");
  const send = $("send"), stop = $("stop"), newChat = $("new-chat"), transcript = $("transcript"), status = $("status");
  const csrfToken = form.elements.csrfmiddlewaretoken.value;
  const history = [];  // the conversation sent with each message: {role, content}
  let plan = null;     // the last /api/quota answer
  let controller = null;

  // ---- Formatting ----------------------------------------------------------------------------

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

  // ---- The quota meter and the plan's controls --------------------------------------------------

  function showWindow(scope, window) {
    $(`${scope}-meter`).max = Math.max(1, window.limit);
    $(`${scope}-meter`).value = Math.min(window.used, window.limit);
    $(`${scope}-used`).textContent = number(window.used);
    $(`${scope}-limit`).textContent = number(window.limit);
    $(`${scope}-left`).textContent = number(window.remaining);
    $(`${scope}-reset`).textContent = resetText(window);
  }

  function showPlan(quota) {
    const chosen = model.value;
    model.replaceChildren(...quota.models.map((name) => new Option(name, name, false, name === chosen)));
    model.disabled = quota.models.length === 0;
    maxTokens.max = quota.max_tokens_per_request;
    if (!maxTokens.value || Number(maxTokens.value) > quota.max_tokens_per_request) {
      maxTokens.value = Math.min(1024, quota.max_tokens_per_request);
    }
    maxTokens.disabled = false;
    $("max-tokens-hint").textContent = `(up to ${number(quota.max_tokens_per_request)})`;
    if (!quota.models.length) say("Your plan has no models available. Contact the operator.");
  }

  async function refreshQuota() {
    let response;
    try {
      response = await fetch("/api/quota", { headers: { Accept: "application/json" }, credentials: "same-origin" });
    } catch {
      return plan;  // offline: keep the last figures
    }
    if (!response.ok) {
      if (!plan) say(await refusal(response));
      return plan;
    }
    plan = await response.json();
    showWindow("day", plan.tokens.day);
    showWindow("month", plan.tokens.month);
    const requests = plan.requests;
    $("requests-left").textContent = requests.remaining == null ? ""
      : `${number(requests.remaining)} of ${number(requests.limit_per_minute)} requests left this minute`;
    if ([...model.options].map((option) => option.value).join() !== plan.models.join() || model.disabled) showPlan(plan);
    setBusy(Boolean(controller));
    return plan;
  }

  // ---- Human messages for every refusal ----------------------------------------------------------

  // The window that refused: the one with the fewest tokens left.
  function tightestWindow() {
    const tokens = plan && plan.tokens;
    if (!tokens) return null;
    return tokens.day.remaining <= tokens.month.remaining ? ["today's", tokens.day] : ["this month's", tokens.month];
  }

  function quotaMessage(prefix) {
    const tightest = tightestWindow();
    if (!tightest) return `${prefix} your token quota is used up.`;
    const [name, window] = tightest;
    const left = window.remaining > 0
      ? `only ${number(window.remaining)} of ${name} tokens are left, too few to continue.`
      : `you've used all of ${name} tokens.`;
    return `${prefix} ${left} ${resetText(window)}.`;
  }

  // code: the OpenAI-style error code; httpStatus and retryAfter when the refusal came as an HTTP response.
  function explain(code, httpStatus, retryAfter, serverMessage) {
    const retry = retryAfter ? ` Try again in ${inTime(retryAfter)}.` : " Try again in a moment.";
    if (code === "rate_limit_exceeded") {
      const limit = plan ? ` (${number(plan.requests.limit_per_minute)} a minute)` : "";
      return `You're sending messages faster than your plan allows${limit}.${retry}`;
    }
    if (code === "concurrency_limit_exceeded") {
      const limit = plan ? ` (${plan.concurrent_streams})` : "";
      return `You already have as many answers streaming as your plan allows${limit}, perhaps in another tab. `
        + "Wait for one to finish, then send again.";
    }
    if (code === "insufficient_quota") return quotaMessage("Not sent:");
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

  async function refusal(response) {
    let error = {};
    if ((response.headers.get("Content-Type") || "").includes("application/json")) {
      try { error = (await response.json()).error || {}; } catch { /* not the JSON we expected */ }
    }
    const retryAfter = Number(response.headers.get("Retry-After")) || 0;
    if (error.code === "insufficient_quota") await refreshQuota();
    return explain(error.code, response.status, retryAfter, error.message);
  }

  // ---- The conversation --------------------------------------------------------------------------

  function say(text) { status.textContent = text; }

  function addTurn(role, text) {
    $("empty-state")?.remove();
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const who = document.createElement("p");
    who.className = "who";
    who.textContent = role === "user" ? "You" : model.value;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    transcript.append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  // Keeps the end of a growing answer in view, unless the reader has scrolled up to read.
  function follow(element, grow) {
    const root = document.documentElement;
    const atEnd = root.scrollTop + root.clientHeight >= root.scrollHeight - 48;
    grow();
    if (atEnd) element.scrollIntoView({ block: "end" });
  }

  function addNotice(turn, text, kind) {
    const notice = document.createElement("p");
    notice.className = `notice ${kind}`;
    notice.setAttribute("role", kind === "error" ? "alert" : "status");
    notice.textContent = text;
    turn.append(notice);
    notice.scrollIntoView({ block: "end" });
  }

  function setBusy(busy) {
    prompt.disabled = busy;
    send.disabled = busy || !plan || !plan.models.length;
    newChat.disabled = busy;
    stop.disabled = !busy;
  }

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

  // Streams one answer into the text node; returns how it ended: [state, message].
  async function readAnswer(response, text) {
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") return ["done"];
      const chunk = JSON.parse(data);
      if (chunk.error) {
        if (chunk.error.code !== "insufficient_quota") return ["error", explain(chunk.error.code, 0, 0)];
        await refreshQuota();
        return ["cut", quotaMessage("The answer was cut short:")];
      }
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) follow(text.parentElement, () => text.appendData(piece));
      }
    }
    return ["interrupted", "The connection dropped before the answer finished."];
  }

  async function ask(question) {
    const userTurn = addTurn("user", question);
    history.push({ role: "user", content: question });
    controller = new AbortController();
    setBusy(true);
    stop.focus();
    say("Answering…");
    let turn = null, text = null, outcome;
    try {
      const response = await fetch("/api/chat", {
        method: "POST",
        credentials: "same-origin",
        signal: controller.signal,
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", "X-CSRFToken": csrfToken },
        body: JSON.stringify({ model: model.value, messages: history, max_tokens: Number(maxTokens.value) || undefined }),
      });
      if (!response.ok) {
        outcome = ["refused", await refusal(response)];
      } else {
        turn = addTurn("assistant", "");
        turn.dataset.requestId = response.headers.get("x-request-id") || "";
        turn.dataset.state = "streaming";
        turn.setAttribute("aria-busy", "true");
        text = document.createTextNode("");
        turn.querySelector(".text").append(text);
        outcome = await readAnswer(response, text);
      }
    } catch (error) {
      outcome = error.name === "AbortError" ? ["stopped", "Stopped."]
        : text ? ["interrupted", "The connection dropped before the answer finished."]
        : ["refused", "Couldn't reach Sluice. Check your connection and try again."];
    }
    controller = null;
    await settle(question, userTurn, turn, text, outcome);
  }

  // Records how the exchange ended: on the answer if one started, otherwise on the question.
  async function settle(question, userTurn, turn, text, [state, message]) {
    const kind = state === "stopped" ? "info" : "error";
    if (text && text.length) {
      history.push({ role: "assistant", content: text.data });
    } else {
      history.pop();  // nothing came back: don't resend a question without its answer
      if (!turn && !prompt.value) prompt.value = question;  // kept, to send again later
    }
    const where = turn || userTurn;
    where.dataset.state = state;  // no answer started: "refused" or "stopped"
    where.removeAttribute("aria-busy");
    if (message) addNotice(where, message, kind);
    await refreshQuota();
    setBusy(false);
    const day = plan && plan.tokens.day;
    // Refusals and interruptions are announced by their notice (role alert); don't say them twice.
    say(state === "done" && day ? `Answer complete. ${number(day.remaining)} tokens left today.` : "");
    prompt.focus();
  }

  // ---- Wiring --------------------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = prompt.value.trim();
    if (!question || controller) return;
    prompt.value = "";
    ask(question);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller) controller.abort();
  });
  newChat.addEventListener("click", () => {
    history.length = 0;
    transcript.replaceChildren();
    say("New chat started.");
    prompt.focus();
  });

  // scrollIntoView must not put the newest text under the sticky composer.
  new ResizeObserver(() => {
    document.documentElement.style.scrollPaddingBottom = `${form.offsetHeight + 16}px`;
  }).observe(form);
  refreshQuota();
})();
