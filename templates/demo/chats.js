// Sluice's chat page, the chats: conversations kept on the server (/api/conversations) and their list beside the
// conversation (open, rename, delete). chat.js drives it through SluiceChats({...}). Inlined by demo/chat.html, so
// this file must not contain Django template tags. Titles are set as text only.
(() => {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const ICONS = {
    rename: "M4 20h4L19 9l-4-4L4 16v4zM14 6l4 4",
    delete: "M5 7h14M10 7V4h4v3M7 7l1 13h8l1-13M10 11v6M14 11v6",
  };

  // A keepalive request outlives the page (a reload right after an answer still saves it), up to 64 KiB in flight.
  const KEEPALIVE_BYTES = 60_000;

  // csrfToken; refusal(response) → {message, serverMessage}; say(text); current() → the open conversation's id;
  // open(id) opens one; renamed(id, title) and deleted(id) after one is renamed or deleted.
  window.SluiceChats = ({ csrfToken, refusal, say, current, open, renamed, deleted }) => {
    const nav = document.getElementById("history"), list = document.getElementById("history-list");
    const toggle = document.getElementById("history-toggle"), empty = document.getElementById("history-empty");
    let saving = Promise.resolve();  // saves run one after another (the first creates the conversation)

    // JSON to and from /api/; a refusal throws an Error with a sentence for people and the response's status.
    async function request(method, path, body) {
      const json = body ? JSON.stringify(body) : undefined;
      const response = await fetch(path, {
        method,
        credentials: "same-origin",
        keepalive: method !== "GET" && (json || "").length < KEEPALIVE_BYTES,
        headers: { Accept: "application/json", "X-CSRFToken": csrfToken,
                   ...(body ? { "Content-Type": "application/json" } : {}) },
        body: json,
      });
      if (!response.ok) {
        const refused = await refusal(response);
        // A 4xx about the input is said in the server's words; anything else in the page's own.
        const own = response.status >= 500 || [401, 403, 429].includes(response.status);
        const error = new Error(own || !refused.serverMessage ? refused.message : refused.serverMessage);
        error.status = response.status;
        throw error;
      }
      return response.json();
    }

    // `step` after every save queued before it.
    function queue(step) {
      const done = saving.then(step);
      saving = done.catch(() => null);
      return done;
    }

    // The page's messages ({role, content, …}) saved at the end of `target` ({id, title}; no id yet: a new
    // conversation, whose id it gets), except those saved already (each is marked `saved`). Resolves to the saved
    // messages' JSON, or null if the save failed (and was said).
    function save(target, messages) {
      return queue(async () => {
        const unsaved = messages.filter((message) => !message.saved);
        const wire = unsaved.map(({ role, content, model, request_id: requestId, ending }) => {
          content = content.replace(/\0/g, "");  // PostgreSQL's text holds no NUL
          return role === "user" ? { role, content } : { role, content, model, request_id: requestId, ending };
        });
        if (!wire.length) return [];
        try {
          let saved;
          if (target.id) {
            const added = await request("POST", `/api/conversations/${target.id}/messages`, { messages: wire });
            target.title = added.conversation.title;
            saved = added.data;
          } else {
            const created = await request("POST", "/api/conversations", { messages: wire });
            Object.assign(target, { id: created.id, title: created.title });
            saved = created.messages;
          }
          unsaved.forEach((message) => { message.saved = true; });
          await refresh();
          return saved;
        } catch (error) {
          say(`This chat couldn't be saved: ${error.message}`);
          return null;
        }
      });
    }

    // Deletes `target` once its saves are done (a first question that got no answer).
    function discard(target) {
      return queue(async () => {
        if (!target.id) return;
        try {
          await request("DELETE", `/api/conversations/${target.id}`);
        } catch {
          // Left in the list with its question: the user can delete it.
        }
        target.id = null;
        await refresh();
      });
    }

    async function refresh() {
      let chats;
      try {
        chats = await request("GET", "/api/conversations");
      } catch {
        return;  // offline: keep the list as it is
      }
      list.replaceChildren(...chats.data.map(item));
      empty.hidden = chats.data.length > 0;
      toggle.textContent = `Chats (${chats.data.length})`;
      mark(current());
    }

    function mark(id) {
      for (const entry of list.children) {
        if (Number(entry.dataset.id) === id) entry.setAttribute("aria-current", "page");
        else entry.removeAttribute("aria-current");
      }
    }

    function iconButton(kind, label) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = `icon ${kind}`;
      button.setAttribute("aria-label", label);
      button.title = kind === "rename" ? "Rename" : "Delete";
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 24 24");
      svg.setAttribute("aria-hidden", "true");
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("d", ICONS[kind]);
      svg.append(path);
      button.append(svg);
      return button;
    }

    function item(data) {
      const entry = document.createElement("li");
      entry.className = "conversation-item";
      entry.dataset.id = data.id;
      const name = data.title || "Untitled chat";
      const opener = document.createElement("button");
      opener.type = "button";
      opener.className = "open";
      opener.textContent = name;
      opener.title = name;
      opener.addEventListener("click", () => open(data.id));
      const rename = iconButton("rename", `Rename “${name}”`);
      rename.addEventListener("click", () => startRename(entry, data));
      const remove = iconButton("delete", `Delete “${name}”`);
      remove.addEventListener("click", () => removeChat(data, name));
      entry.append(opener, rename, remove);
      return entry;
    }

    function startRename(entry, data) {
      const input = document.createElement("input");
      input.type = "text";
      input.className = "rename-input";
      input.value = data.title;
      input.maxLength = 120;
      input.setAttribute("aria-label", "New name for the chat");
      let finished = false;
      const finish = async (keep) => {
        if (finished) return;
        finished = true;
        const name = input.value.trim();
        if (keep && name && name !== data.title) {
          try {
            const saved = await request("PATCH", `/api/conversations/${data.id}`, { title: name });
            renamed(data.id, saved.title);
            say(`Renamed to “${saved.title}”.`);
          } catch (error) {
            say(`Couldn't rename the chat: ${error.message}`);
          }
        }
        await refresh();
        list.querySelector(`[data-id="${data.id}"] .open`)?.focus();
      };
      input.addEventListener("keydown", (event) => {
        if (event.key === "Enter") { event.preventDefault(); finish(true); }
        if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finish(false); }
      });
      input.addEventListener("blur", () => finish(true));
      entry.replaceChildren(input);
      input.focus();
      input.select();
    }

    async function removeChat(data, name) {
      if (!window.confirm(`Delete “${name}”? This can't be undone.`)) return;
      try {
        await request("DELETE", `/api/conversations/${data.id}`);
      } catch (error) {
        say(`Couldn't delete the chat: ${error.message}`);
        return;
      }
      deleted(data.id);
      say(`Deleted “${name}”.`);
      await refresh();
    }

    // Below 1024 px the list folds into a bar: "Chats (N)" opens it.
    toggle.addEventListener("click", () => toggle.setAttribute("aria-expanded", String(nav.classList.toggle("open"))));

    return {
      request, save, discard, refresh, mark,
      saved: () => saving,  // the last save's end (what New chat and opening a chat wait for)
      fold() {
        nav.classList.remove("open");
        toggle.setAttribute("aria-expanded", "false");
      },
      // While an answer streams, the list waits (opening another chat would leave the answer nowhere).
      hold(busy) {
        nav.inert = busy;
        nav.classList.toggle("busy", busy);
      },
    };
  };
})();
