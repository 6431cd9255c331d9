// Sluice's Markdown renderer for model output: SluiceMarkdown.render(text) → a DocumentFragment.
// Hand-written on purpose (docs/demo.md, "Markdown"): it never parses HTML. Every character of the text ends up in a
// text node (Node.append with a string, or textContent); elements come only from the fixed set below, and the only
// attributes it sets are a link's href (an absolute http, https or mailto URL), rel and target, a list's start
// number, a table cell's alignment and fixed class names. So markup in an answer is shown as text, never run.
// Inlined by demo/chat.html, like chat.js: this file must not contain Django template tags.
(() => {
  "use strict";

  // Block starts. A line is tested against these in this order.
  const BLANK = /^\s*$/;
  const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
  const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  const LANGUAGE_MAX_CHARS = 24;

  // Inline spans: the leftmost match wins; at one position the alternatives are tried in this order.
  const INLINE = new RegExp([
    /(`+)([^`]|[^`][^]*?[^`])\1(?!`)/.source,                                       // 1, 2: `code`
    /\*\*(?=\S)([^]*?\S)\*\*/.source,                                                // 3: **strong**
    /(?<![\p{L}\p{N}_])__(?=\S)([^]*?\S)__(?![\p{L}\p{N}_])/.source,                  // 4: __strong__
    /~~(?=\S)([^]*?\S)~~/.source,                                                    // 5: ~~deleted~~
    /\*(?=[^\s*])([^]*?[^\s*])\*(?!\*)/.source,                                      // 6: *emphasis*
    /(?<![\p{L}\p{N}_])_(?=[^\s_])([^]*?[^\s_])_(?![\p{L}\p{N}_])/.source,            // 7: _emphasis_
    /\[([^[\]\n]+)\]\([ \t]*<?([^\s<>()]+)>?(?:[ \t]+"[^"\n]*")?[ \t]*\)/.source,      // 8, 9: [text](url)
    /<(https?:\/\/[^\s<>]+)>/.source,                                                // 10: <https://…>
    /(?<![\w/@.])(https?:\/\/[^\s<>()]*[^\s<>().,:;!?'"*_~\]])/.source,               // 11: a bare URL
    /\\([!-/:-@[-`{-~])/.source,                                                     // 12: \* and other escapes
  ].join("|"), "gu");
  const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

  function element(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    node.append(...children);  // strings become text nodes
    return node;
  }

  const leadingSpaces = (line) => line.match(/^[ \t]*/)[0].replace(/\t/g, "    ").length;

  // ---- Inline ----------------------------------------------------------------------------------------------------

  function safeUrl(text) {
    try {
      const url = new URL(text);  // absolute URLs only: a relative one would point into Sluice itself
      return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
    } catch {
      return null;
    }
  }

  function link(href, children) {
    const a = element("a", "", ...children);
    a.href = href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    return a;
  }

  function span(match) {
    const [whole, , code, strong1, strong2, deleted, em1, em2, text, url, angled, bare, escaped] = match;
    if (code !== undefined) {
      const trimmed = /^ .*[^ ].* $/.test(code) ? code.slice(1, -1) : code;
      return element("code", "", trimmed);
    }
    if (strong1 !== undefined || strong2 !== undefined) return inline(element("strong"), strong1 ?? strong2);
    if (deleted !== undefined) return inline(element("del"), deleted);
    if (em1 !== undefined || em2 !== undefined) return inline(element("em"), em1 ?? em2);
    if (text !== undefined) {
      const href = safeUrl(url);
      return href ? link(href, [inline(document.createDocumentFragment(), text)]) : whole;
    }
    if (angled !== undefined || bare !== undefined) {
      const href = safeUrl(angled ?? bare);
      return href ? link(href, [angled ?? bare]) : whole;
    }
    return escaped;
  }

  function inline(parent, text) {
    let last = 0;
    for (const match of text.matchAll(INLINE)) {
      if (match.index > last) parent.append(text.slice(last, match.index));
      parent.append(span(match));
      last = match.index + match[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
    return parent;
  }

  // ---- Blocks ------------------------------------------------------------------------------------------------------

  function startsBlock(lines, i) {
    const line = lines[i];
    const item = ITEM.exec(line);
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
      || (item && item[3] && (!/\d/.test(item[2]) || /^1[.)]$/.test(item[2])))
      || (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]));
  }

  function codeBlock(code, language) {
    const head = element("div", "code-head", element("span", "code-lang", language.slice(0, LANGUAGE_MAX_CHARS)));
    const copy = element("button", "copy", "Copy");
    copy.type = "button";  // chat.js copies the block's code on click
    head.append(copy);
    return element("div", "code-block", head, element("pre", "", element("code", "", code)));
  }

  function fenced(lines, start, parent, [, fence, language]) {
    const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
    const code = [];
    let i = start + 1;
    while (i < lines.length && !closing.test(lines[i])) code.push(lines[i++]);
    parent.append(codeBlock(code.join("\n"), language));
    return i < lines.length ? i + 1 : i;  // an unclosed fence (an answer still streaming) runs to the end
  }

  function list(lines, start, parent) {
    const first = ITEM.exec(lines[start]);
    const ordered = /\d/.test(first[2]);
    const node = element(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    const items = [];
    let loose = false, i = start;
    while (i < lines.length) {
      if (BLANK.test(lines[i])) {  // a blank line between two items of the same list: a loose list
        let next = i;
        while (next < lines.length && BLANK.test(lines[next])) next++;
        const item = next < lines.length && ITEM.exec(lines[next]);
        if (!item || /\d/.test(item[2]) !== ordered) break;
        loose = true;
        i = next;
      }
      const item = ITEM.exec(lines[i]);
      if (!item || /\d/.test(item[2]) !== ordered) break;
      const indent = item[1].length + item[2].length + 1;
      const content = [item[3] || ""];
      i++;
      while (i < lines.length) {
        const line = lines[i];
        if (BLANK.test(line)) {  // part of the item only if what follows is indented under it
          let next = i;
          while (next < lines.length && BLANK.test(lines[next])) next++;
          if (next >= lines.length || leadingSpaces(lines[next]) < 2) break;
          content.push(...lines.slice(i, next).map(() => ""));
          i = next;
          continue;
        }
        const spaces = leadingSpaces(line);
        if (spaces >= 2) {  // indented under the item: its own blocks (a nested list, a code block)
          content.push(line.replace(/^[ \t]+/, (ws) => ws.replace(/\t/g, "    ")).slice(Math.min(spaces, indent)));
        } else if (startsBlock(lines, i) || ITEM.test(line)) {
          break;
        } else {
          content.push(line);  // a lazy continuation of the item's paragraph
        }
        i++;
      }
      items.push(content);
    }
    for (const content of items) {
      const li = element("li");
      blocks(content, li);
      if (!loose) {  // a tight list: its items' paragraphs are not paragraphs
        for (const p of [...li.children].filter((child) => child.tagName === "P")) p.replaceWith(...p.childNodes);
      }
      node.append(li);
    }
    parent.append(node);
    return i;
  }

  function cells(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
  }

  function table(lines, start, parent) {
    const head = cells(lines[start]);
    const aligns = cells(lines[start + 1]).map((rule) =>
      rule.startsWith(":") && rule.endsWith(":") ? "center" : rule.endsWith(":") ? "right" : "");
    const row = (values, tag) => {
      const tr = element("tr");
      head.forEach((_, n) => {
        const cell = inline(element(tag), values[n] ?? "");
        if (aligns[n]) cell.style.textAlign = aligns[n];
        tr.append(cell);
      });
      return tr;
    };
    const body = element("tbody");
    let i = start + 2;
    while (i < lines.length && !BLANK.test(lines[i]) && lines[i].includes("|")) body.append(row(cells(lines[i++]), "td"));
    parent.append(element("div", "table-wrap", element("table", "", element("thead", "", row(head, "th")), body)));
    return i;
  }

  function paragraph(lines, start, parent) {
    const p = element("p");
    let i = start;
    do {
      if (i > start) p.append(element("br"));  // a chat's line breaks are meant: kept
      inline(p, lines[i++]);
    } while (i < lines.length && !BLANK.test(lines[i]) && !startsBlock(lines, i));
    parent.append(p);
    return i;
  }

  function blocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let match;
      if (BLANK.test(line)) {
        i++;
      } else if ((match = FENCE.exec(line))) {
        i = fenced(lines, i, parent, match);
      } else if ((match = HEADING.exec(line))) {
        parent.append(inline(element(`h${Math.min(6, match[1].length + 2)}`), match[2] || ""));
        i++;
      } else if (RULE.test(line)) {
        parent.append(element("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && (match = QUOTE.exec(lines[i]))) { quoted.push(match[1]); i++; }
        const quote = element("blockquote");
        blocks(quoted, quote);
        parent.append(quote);
      } else if (ITEM.test(line) && ITEM.exec(line)[3] !== undefined) {
        i = list(lines, i, parent);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
        i = table(lines, i, parent);
      } else {
        i = paragraph(lines, i, parent);
      }
    }
    return parent;
  }

  window.SluiceMarkdown = Object.freeze({
    render: (text) => blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), document.createDocumentFragment()),
  });
})();
