"""The chat page as issue 19 asks (items 1-5 and 11), in headless Chromium against the session's gateway: Markdown that
is never HTML, conversations kept on the server, honest endings, the page's states, and the small things.

Screenshots go to artifacts/ (tests/support/browser.py), at 1280×800 and 390×844.
"""

import json
import time

import httpx2
import pytest

from tests.support.browser import PASSWORD, screenshot, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LAST = "[...document.querySelectorAll('.turn.assistant')].at(-1)"
STATE = f"{LAST}?.dataset.state"
PHONE = {"width": 390, "height": 844}


def send(page, text):
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def settled(page):
    """Until the page has settled the answer (and refreshed the meter); returns the newest answer's turn."""
    page.wait_for_function("document.getElementById('stop').disabled && !document.getElementById('prompt').disabled")
    return page.locator(".turn.assistant").last


def answer_saved(page):
    """Until the newest answer's save has ended (the page saves an exchange once its answer has ended)."""
    page.wait_for_function(f"{LAST}?.dataset.saved === 'true'")


def log_in(page, user):
    """Sign in without waiting for Send (a suspended or spent user never gets it); waits for the quota."""
    page.goto("/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/")
    page.wait_for_function("document.getElementById('day-limit').textContent !== '–'")
    return page


def sse(*events):
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def delta(text):
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def answered_with(page, *events):
    """/api/chat answered by the browser's network layer with these SSE events (ended by [DONE] if not given)."""
    body = sse(*events) if events[-1] == "[DONE]" or "error" in events[-1] else sse(*events, "[DONE]")
    page.route("**/api/chat", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body,
                                                           headers={"x-request-id": "req-routed"}))


# ---- 1. Markdown and code ----------------------------------------------------------------------------------------

MARKDOWN = """## A heading

Some **bold**, *emphasis*, `inline code` and a [link](https://example.org/docs).

1. first
2. second
   - nested

```python
def greet(name):
    return f"<b>{name}</b>"
```

| tool | use |
|---|---|
| sluice | water |

<img src=x onerror="alert('answer')"> and [bad](javascript:alert(1))"""

ALLOWED_TAGS = {"P", "BR", "H3", "H4", "H5", "H6", "HR", "BLOCKQUOTE", "UL", "OL", "LI", "DIV", "SPAN", "BUTTON",
                "PRE", "CODE", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "STRONG", "EM", "DEL", "A"}
ALLOWED_ATTRIBUTES = {"class", "href", "rel", "target", "start", "style", "type"}
HOSTILE = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '<a href="javascript:alert(1)">x</a>',
    "[x](javascript:alert(1))", "[x](JaVaScRiPt:alert(1))", "[x](data:text/html;base64,PHNjcmlwdD4=)",
    "[x](vbscript:msgbox(1))", "[x](/admin/)", "![pic](https://example.org/a.png)",
    '<https://example.org/a"onmouseover=alert(1)>', "```html\n<img src=x onerror=alert(1)>\n```",
    "```\n</code></pre><script>alert(1)</script>\n```", "`<b>x</b>`", "**<i>x</i>**", "> <svg onload=alert(1)>",
    "- <iframe src=x></iframe>", "# <style>body{display:none}</style>", "<!-- comment --><p onclick=x>",
    "| <b>a</b> | b |\n|:-:|--:|\n| <img src=x> | [y](javascript:x) |", "1) one\n2) <object data=x>",
    "&lt;img src=x onerror=alert(1)&gt;", "\\<img src=x onerror=alert(1)\\>", "**unclosed `code *span",
]


def test_answers_render_as_markdown_with_code_blocks_and_never_as_html(open_page, sim, make_user):
    page = sign_in(open_page(), make_user().user)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    # Streamed in small pieces that cut through the Markdown's syntax, as a model's tokens do.
    answered_with(page, *[delta(MARKDOWN[i:i + 7]) for i in range(0, len(MARKDOWN), 7)])
    send(page, "<img src=x onerror=alert('prompt')> **not bold**")
    settled(page)

    answer = page.locator(".turn.assistant .text").last
    assert answer.locator("h4").text_content() == "A heading"
    assert answer.locator("p strong").text_content() == "bold"
    assert answer.locator("p em").text_content() == "emphasis"
    assert answer.locator("p > code").text_content() == "inline code"
    assert answer.locator("ol > li").count() == 2 and answer.locator("ol ul > li").text_content() == "nested"
    assert answer.locator("table td").all_text_contents() == ["sluice", "water"]
    links = answer.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/docs"
    assert links.get_attribute("rel") == "noopener noreferrer nofollow"
    code = answer.locator(".code-block pre code")
    assert code.text_content() == 'def greet(name):\n    return f"<b>{name}</b>"'
    assert "monospace" in code.evaluate("node => getComputedStyle(node).fontFamily")
    assert answer.locator(".code-lang").text_content() == "python"
    # The markup in the answer and in the question is text.
    assert "<img src=x onerror=\"alert('answer')\"> and [bad](javascript:alert(1))" in answer.text_content()
    assert page.locator(".turn.user .text").text_content() == "<img src=x onerror=alert('prompt')> **not bold**"
    assert page.locator("#transcript img, #transcript b, #transcript script, #transcript iframe").count() == 0

    answer.get_by_role("button", name="Copy").click()
    page.wait_for_function("document.querySelector('.code-block .copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == code.text_content()
    screenshot(page, "chat-markdown", full_page=False)

    # Hostile Markdown through the renderer itself: only the renderer's elements and attributes, only safe links.
    found = page.evaluate("""(samples) => samples.map((sample) => {
        const holder = document.createElement('div');
        holder.append(SluiceMarkdown.render(sample));
        return [...holder.querySelectorAll('*')].map((node) => ({
          tag: node.tagName, attributes: [...node.attributes].map((a) => [a.name, a.value]) }));
      })""", HOSTILE)
    for sample, nodes in zip(HOSTILE, found):
        for node in nodes:
            assert node["tag"] in ALLOWED_TAGS, (sample, node)
            for name, value in node["attributes"]:
                assert name in ALLOWED_ATTRIBUTES, (sample, node)
                if name == "href":
                    assert value.startswith(("https://", "http://", "mailto:")), (sample, value)
                if name == "style":
                    assert value.startswith("text-align:"), (sample, value)
    assert dialogs == []


# ---- 2. Conversations kept on the server --------------------------------------------------------------------------

def chats(page):
    return page.locator("#history-list .open").all_text_contents()


def test_conversations_are_kept_and_can_be_opened_renamed_deleted_and_new_chat_undone(open_page, sim, make_user):
    caller = make_user()
    page = sign_in(open_page(), caller.user)
    send(page, "First question")
    first = settled(page)
    assert first.locator(".meta").text_content() == "48 tokens"  # the simulator's default answer
    answer_saved(page)
    assert chats(page) == ["First question"]
    assert "?c=" in page.url

    page.reload()  # the conversation comes back from the server, token count and all (from the ledger)
    page.wait_for_function("document.querySelectorAll('#transcript .turn').length === 2")
    assert page.locator(".turn.user .text").text_content() == "First question"
    assert page.locator(".turn.assistant .meta").text_content() == "48 tokens"
    assert page.locator("#conversation-title").text_content() == "First question"
    assert page.evaluate("document.activeElement.id") == "prompt"

    page.get_by_role("button", name="New chat").click()
    page.wait_for_selector("#empty-state")
    assert page.locator("#conversation-title").text_content() == "New chat" and "?c=" not in page.url
    page.get_by_role("button", name="Undo").click()
    page.wait_for_function("document.querySelectorAll('#transcript .turn').length === 2")
    assert page.locator("#conversation-title").text_content() == "First question"

    page.get_by_role("button", name="New chat").click()
    page.wait_for_selector("#empty-state")
    send(page, "Second question")
    settled(page)
    answer_saved(page)
    assert chats(page) == ["Second question", "First question"]  # the newest first

    page.get_by_role("button", name="Rename “First question”").click()
    page.get_by_label("New name for the chat").fill("Sluices, renamed")
    page.get_by_label("New name for the chat").press("Enter")
    page.wait_for_function("[...document.querySelectorAll('#history-list .open')].some(b => b.textContent === "
                           "'Sluices, renamed')")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete “Second question”").click()  # the open one: a new chat follows
    page.wait_for_function("document.querySelectorAll('#history-list li').length === 1")
    assert page.locator("#empty-state").is_visible()
    screenshot(page, "chat-conversations-list")

    page.get_by_role("button", name="Sluices, renamed", exact=True).click()
    page.wait_for_function("document.querySelectorAll('#transcript .turn').length === 2")
    assert page.locator("#conversation-title").text_content() == "Sluices, renamed"
    from streaming.conversations.models import Conversation

    saved = Conversation.objects.get(user=caller.user)
    assert saved.title == "Sluices, renamed"
    assert [(m.role, m.content[:15]) for m in saved.messages.all()] == [("user", "First question"),
                                                                         ("assistant", " the quick brow")]

    # A reload while a new chat's first answer streams keeps the chat, with its question (saved as it was sent).
    page.get_by_role("button", name="New chat").click()
    sim.control(tokens_per_second=20, default_tokens=200)
    send(page, "Third question")
    page.wait_for_function(f"{LAST}.querySelector('.text').textContent.length > 0 && location.search")
    page.reload()
    page.wait_for_function("document.querySelectorAll('#transcript .turn').length === 1")
    assert page.locator(".turn.user .notice").text_content() == "No answer was saved for this question."

    phone = sign_in(open_page(viewport=PHONE), caller.user)
    phone.get_by_role("button", name="Chats (2)").click()
    assert phone.locator("#history-list .open").first.is_visible()
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(phone, "chat-conversations-phone", full_page=False)


# ---- 3. Honest endings ---------------------------------------------------------------------------------------------

def test_an_answer_cut_at_max_tokens_offers_continue(open_page, sim, make_user):
    page = sign_in(open_page(), make_user().user)
    page.get_by_label("Max tokens").fill("6")
    send(page, "Tell me everything")
    answer = settled(page)
    assert answer.locator(".notice").text_content().startswith("This answer reached its limit of 6 tokens.")
    assert "Answer complete" not in page.locator("#status").text_content()
    with page.expect_request("**/api/chat") as request:
        answer.get_by_role("button", name="Continue").click()
    body = request.value.post_data_json
    assert body["messages"][-2]["role"] == "assistant" and body["messages"][-1]["content"].startswith("Continue")
    settled(page)
    assert page.locator(".turn.assistant").count() == 2 and page.locator(".turn.user").count() == 1
    assert page.locator(".turn.assistant").last.get_by_role("button", name="Continue").count() == 1
    assert page.locator(".turn.assistant").first.get_by_role("button", name="Continue").count() == 0
    screenshot(page, "chat-continue", full_page=False)


def test_an_answer_limited_by_the_quota_left_says_so_and_a_cut_keeps_its_message(open_page, sim, make_user):
    page = sign_in(open_page(), make_user(tokens_per_day=40).user)
    send(page, "hello")
    answer = settled(page)
    notice = answer.locator(".notice").text_content()
    assert notice.startswith("This answer was cut short by your quota"), notice
    assert "of the 1,024 asked for" in notice and answer.get_by_role("button", name="Continue").count() == 0
    assert page.locator("#status").text_content() == "The answer was cut short by your quota."
    # Nothing left today: the banner says so (once the answer's lease has settled), and Send waits for the reset.
    page.locator("#banner").wait_for()
    assert page.locator("#banner").text_content().startswith("You've used all of today's tokens")
    assert page.get_by_role("button", name="Send").is_disabled()
    answer_saved(page)
    page.reload()  # saved as ended by the quota
    page.wait_for_function("document.querySelectorAll('#transcript .turn').length === 2")
    assert page.locator(".turn.assistant .notice").text_content().startswith("This answer was cut short by your quota")
    assert page.locator("#banner").is_visible()  # and on load

    # A quota cut mid-answer keeps today's message, and is saved as such.
    page = sign_in(open_page(), make_user().user)
    answered_with(page, delta(" partial"), {"error": {"message": "x", "type": "insufficient_quota", "param": None,
                                                      "code": "insufficient_quota"}})
    send(page, "a long one")
    cut = settled(page)
    assert cut.locator(".notice").text_content().startswith("The answer was cut short: ")
    answer_saved(page)
    page.unroute("**/api/chat")
    page.reload()
    page.wait_for_function("document.querySelectorAll('#transcript .turn').length === 2")
    assert page.locator(".turn.assistant .notice").text_content().startswith("The answer was cut short")


# ---- 4. The page's states ------------------------------------------------------------------------------------------

def test_thinking_until_the_first_token_with_the_picker_and_max_tokens_locked(open_page, sim, make_user):
    sim.control(ttft_seconds=1.5, default_tokens=10)
    page = sign_in(open_page(), make_user(allowed_models=["sim-small", "sim-large"]).user)
    page.get_by_label("Model").select_option("sim-large")
    send(page, "Think first")
    thinking = page.locator(".turn.assistant .thinking")
    thinking.wait_for()
    assert thinking.text_content() == "Thinking…"
    assert page.get_by_label("Model").is_disabled() and page.get_by_label("Max tokens").is_disabled()
    assert page.locator(".turn.assistant .who").text_content() == "sim-large"
    screenshot(page, "chat-thinking", full_page=False)
    page.wait_for_function(f"{LAST}.querySelector('.text').textContent.length > 0")
    assert thinking.count() == 0
    settled(page)
    assert page.get_by_label("Model").is_enabled() and page.get_by_label("Max tokens").is_enabled()


def test_a_rate_limit_is_one_banner_counting_down_not_a_copy_of_the_question_per_try(open_page, sim, make_user):
    page = sign_in(open_page(), make_user(requests_per_minute=1).user)
    send(page, "one")
    settled(page)
    send(page, "two")
    banner = page.locator("#banner")
    banner.wait_for()
    assert page.locator("#banner-text").text_content() == \
        "You're sending messages faster than your plan allows (1 a minute)."
    wait = page.locator("#banner-wait").text_content()
    page.wait_for_function(f"document.getElementById('banner-wait').textContent !== {json.dumps(wait)}")
    assert page.locator("#banner-wait").text_content().startswith("Try again in ")
    assert page.get_by_label("Message").input_value() == "two"  # back in the box, to send later
    assert page.get_by_role("button", name="Send").is_disabled()
    page.get_by_label("Message").press("Enter")  # held: no new try, no copy
    assert page.locator(".turn.user .text").all_text_contents() == ["one"]
    assert page.locator(".notice").count() == 0
    screenshot(page, "chat-rate-limited", full_page=False)


def test_a_suspended_user_sees_a_banner_on_load_and_cannot_send(open_page, sim, make_user):
    from quotas.models import UserQuota

    caller = make_user()
    UserQuota.objects.filter(user=caller.user).update(suspended=True)
    page = log_in(open_page(), caller.user)
    page.locator("#banner").wait_for()
    assert page.locator("#banner").text_content().startswith("Your account is suspended")
    assert page.get_by_role("button", name="Send").is_disabled()


def test_a_user_out_of_quota_sees_a_banner_on_load(open_page, sim, make_user):
    caller = make_user(tokens_per_day=30)
    response = httpx2.post(sim.api_url + "/chat/completions", headers={"Authorization": f"Bearer {caller.key}"},
                           json={"model": "sim-small", "messages": [{"role": "user", "content": "spend it all"}]},
                           timeout=30)
    assert response.status_code == 200, response.text
    page = log_in(open_page(viewport=PHONE), caller.user)
    page.locator("#banner").wait_for()
    assert page.locator("#banner").text_content().startswith("You've used all of today's tokens")
    assert page.get_by_role("button", name="Send").is_disabled()
    assert page.locator("#day-window").get_attribute("data-level") == "critical"
    screenshot(page, "chat-out-of-quota-phone", full_page=False)


def quota_with_day_used(used):
    def fake(route):
        quota = route.fetch().json()
        quota["tokens"]["day"].update(used=used, remaining=quota["tokens"]["day"]["limit"] - used)
        route.fulfill(json=quota)

    return fake


def test_the_meter_turns_amber_then_red_near_the_limit(open_page, sim, make_user):
    page = sign_in(open_page(), make_user().user)
    colour = "getComputedStyle(document.getElementById('day-meter')).accentColor"
    assert page.locator("#day-window").get_attribute("data-level") == "ok"
    normal = page.evaluate(colour)
    for used, level, expected in ((80_000, "ok", normal), (160_000, "warn", "rgb(178, 107, 0)"),
                                  (190_000, "critical", "rgb(201, 48, 44)")):
        page.route("**/api/quota", quota_with_day_used(used))
        page.reload()
        page.wait_for_function(f"document.getElementById('day-used').textContent === '{used:,}'")
        assert page.locator("#day-window").get_attribute("data-level") == level
        assert page.evaluate(colour) == expected
        page.unroute("**/api/quota")
    screenshot(page, "chat-meter-red", full_page=False)


def test_a_hint_suggests_a_new_chat_before_the_body_limit(open_page, sim, make_user):
    page = sign_in(open_page(), make_user().user)
    limit = int(page.locator("#chat").get_attribute("data-max-body-bytes"))
    hint = page.locator("#length-hint")
    assert hint.is_hidden()
    page.get_by_label("Message").fill("x" * int(limit * 0.85))
    hint.wait_for()
    assert "This chat is getting long" in hint.text_content()
    assert page.get_by_role("button", name="Send").is_enabled()
    page.get_by_label("Message").fill("x" * limit)
    page.wait_for_function("document.getElementById('length-hint').dataset.level === 'over'")
    assert "too long to send" in hint.text_content()
    assert page.get_by_role("button", name="Send").is_disabled()
    screenshot(page, "chat-too-long", full_page=False)
    page.get_by_label("Message").fill("short")
    hint.wait_for(state="hidden")
    assert page.get_by_role("button", name="Send").is_enabled()


# ---- 5. Small things -----------------------------------------------------------------------------------------------

def test_the_page_fits_has_a_favicon_focuses_the_box_and_a_stop_note_is_readable(open_page, sim, make_user):
    page = sign_in(open_page(), make_user().user)
    assert page.evaluate("document.activeElement.id") == "prompt"
    size = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    assert size[0] <= 1280 and size[1] <= 800, size  # not even the 11 px of the old layout
    assert page.locator("link[rel=icon]").get_attribute("href").startswith("data:image/svg+xml,")
    screenshot(page, "chat-empty", full_page=False)

    # Stopped before an answer started: the note sits on the question, readable (not blue on blue).
    page.route("**/api/chat", lambda route: None)  # never answered
    send(page, "never mind")
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("document.querySelector('.turn.user[data-state=stopped] .notice')")
    colours = page.evaluate("""() => {
        const notice = document.querySelector('.turn.user[data-state=stopped] .notice');
        const style = (node) => getComputedStyle(node);
        return [style(notice).backgroundColor, style(notice.parentElement).backgroundColor, style(notice).color]; }""")
    assert colours[0] != colours[1], colours
    assert contrast(colours[2], colours[0]) >= 4.5, colours
    screenshot(page, "chat-stopped", full_page=False)
    # A first question with no answer keeps no conversation.
    page.wait_for_function("document.getElementById('history-list').children.length === 0 && !location.search")
    page.unroute("**/api/chat")

    # A long unbroken line and a wide code block scroll inside the answer, never the page.
    answered_with(page, delta("x" * 400 + "\n\n```\n" + "y = 1; " * 80 + "\n```\n\n| a |\n|---|\n| " + "z" * 300 + " |"))
    send(page, "wide")
    settled(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def luminance(rgb):
    values = [int(v) / 255 for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]]
    linear = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in values]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground, background):
    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_the_site_has_styled_404_and_500_pages_and_the_api_keeps_json(open_page, sim, make_user):
    from django.test import RequestFactory

    from streaming.gateway.views import server_error

    page = open_page()
    response = page.goto("/no/such/page")
    assert response.status == 404
    assert page.get_by_role("heading", name="Page not found").is_visible()
    assert page.locator(".error-page code").text_content() == "/no/such/page"
    assert page.locator("link[rel=icon]").count() == 1
    assert page.evaluate("getComputedStyle(document.querySelector('.error-page')).backgroundColor") == \
        "rgb(255, 255, 255)"
    screenshot(page, "page-404", full_page=False)
    api = page.request.get("/api/no-such-endpoint")
    assert api.status == 404 and api.json()["error"]["code"] == "unknown_url"

    # Django's server_error renders templates/500.html with no context at all (for paths outside /v1/ and /api/).
    html = server_error(RequestFactory().get("/somewhere")).content.decode()
    for viewport, name in (({"width": 1280, "height": 800}, "page-500"), (PHONE, "page-500-phone")):
        page = open_page(viewport=viewport)
        page.set_content(html)
        assert page.get_by_role("heading", name="Something went wrong").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(page, name, full_page=False)


# ---- 11. The simulator answers like a model in the demo ------------------------------------------------------------

def test_in_the_demo_style_the_simulator_writes_varied_markdown_at_a_readers_pace(open_page, sim, make_user):
    sim.control(style="demo")
    page = sign_in(open_page(), make_user().user)
    page.get_by_label("Max tokens").fill("90")
    send(page, "Show me some Python code")
    sent = time.monotonic()
    page.wait_for_function(f"{LAST}?.querySelector('.text').textContent.length > 0")
    first = time.monotonic()
    answer = settled(page)
    done = time.monotonic()
    assert "def retry(" in answer.locator(".code-block pre code").text_content()
    assert answer.locator(".code-lang").text_content() == "python"
    tokens = int(answer.locator(".meta").text_content().split()[0])
    assert tokens == 90  # cut at max tokens: the answer is longer
    assert first - sent >= 0.25  # a first-token wait (0.3-0.8 s)
    assert tokens / (done - first) <= 70  # 30-60 tokens a second: watchable, never a dump
    screenshot(page, "chat-demo-answer", full_page=False)

    page.get_by_label("Max tokens").fill("60")
    send(page, "How does a lock work? A list of steps please")
    steps = settled(page)
    assert steps.locator("ol > li").count() >= 2
    assert steps.get_by_role("button", name="Continue").count() == 1


def test_a_user_near_a_limit_is_warned_before_it_runs_out(open_page, sim, make_user):
    sim.control(default_tokens=48)
    account = make_user(tokens_per_day=65)
    page = sign_in(open_page(), account.user)
    assert page.locator("#near-limit").is_hidden()
    send(page, "hello")  # a 48-token answer and an 8-token prompt: 86 % of 65 used, something left
    settled(page)
    page.locator("#near-limit").wait_for()
    note = page.locator("#near-limit").text_content()
    assert note.startswith("You have used ") and "% of today's tokens: " in note and " left. Resets in " in note, note
    used = int(note.split("You have used ")[1].split(" %")[0])
    assert 80 <= used < 100, note
