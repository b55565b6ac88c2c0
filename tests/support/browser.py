"""A scripted browser: httpx with a cookie jar that follows redirects and submits HTML forms.

It walks the authorization path (gateway sign-in, IdP page, consent) the way a person
with a browser would, so the gateway is exercised end to end without a human.

API::

    async with ScriptedBrowser() as browser:
        page = await browser.follow(url, stop_at="http://127.0.0.1:9/cb")
        page = await browser.submit(page, 0, {"email": "a@example.com"}, button=None)
        result = await browser.authorize(url, stop_at=REDIRECT_URI,
                                         idp_login={"sub": "u-1"}, consent="approve")
        # result: the query of the final redirect, e.g. {"code", "state", "iss"} or {"error", ...}

``authorize`` recognises, on each HTML page, one POST form:

- gateway dev sign-in: has an ``email`` input -> filled from ``email=`` or ``idp_login["email"]``;
- the oidc-provider-mock page: has a ``sub`` input -> ``idp_login["sub"]`` (or its deny button
  with ``idp_action="deny"``); any other keys of ``idp_login`` are first PUT to the IdP's
  ``/users/{sub}`` as that user's claims (a test-control endpoint of the mock);
- gateway consent: has buttons named ``decision`` -> presses the one whose value is ``consent``.

Anything else (an error page, a page without such a form, too many steps) raises
``BrowserError`` carrying the last ``Page``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx

__all__ = ["BrowserError", "Form", "Page", "ScriptedBrowser", "parse_forms"]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SUBMIT_BUTTON_TYPES = frozenset({"submit", "image"})
# Input types that never contribute a value unless they are the pressed button.
_NON_VALUE_INPUT_TYPES = frozenset({"submit", "image", "button", "reset", "file"})


class BrowserError(RuntimeError):
    """The scripted walk could not go on; ``page`` is where it stopped."""

    def __init__(self, message: str, page: Page | None = None) -> None:
        detail = ""
        if page is not None:
            detail = f" [{page.status} {page.url}] {page.text[:500]!r}"
        super().__init__(message + detail)
        self.page = page


@dataclass
class Button:
    name: str | None
    value: str
    label: str = ""


@dataclass
class Form:
    """One HTML form as a browser would submit it."""

    action: str  # absolute URL
    method: str  # "GET" or "POST"
    attrs: dict[str, str]
    # (name, value) pairs a browser sends by default: hidden/text inputs, checked boxes,
    # selected options, textareas. Order kept: some servers care.
    fields: list[tuple[str, str]] = field(default_factory=list)
    input_names: dict[str, str] = field(default_factory=dict)  # name -> input type
    buttons: list[Button] = field(default_factory=list)

    def has_input(self, name: str) -> bool:
        return name in self.input_names

    def button_names(self) -> set[str]:
        return {button.name for button in self.buttons if button.name}

    def find_button(self, button: str | tuple[str, str]) -> Button:
        """A ``(name, value)`` pair matches exactly; a string matches a value, then a name."""
        if isinstance(button, tuple):
            name, value = button
            matches = [b for b in self.buttons if b.name == name and b.value == value]
        else:
            matches = [b for b in self.buttons if b.value == button and b.name] or [
                b for b in self.buttons if b.name == button
            ]
        if not matches:
            raise BrowserError(f"no button {button!r} in form {self.buttons!r}")
        return matches[0]


@dataclass
class Page:
    """A response as the browser saw it. ``stopped_at`` is set when following stopped at a
    redirect whose Location starts with the stop prefix (then ``location`` is that URL)."""

    url: str
    status: int
    headers: httpx.Headers
    text: str
    forms: list[Form] = field(default_factory=list)
    location: str | None = None
    stopped_at: str | None = None

    @property
    def is_html(self) -> bool:
        return "html" in self.headers.get("content-type", "")

    def json(self) -> Any:
        return json.loads(self.text)

    def post_forms(self) -> list[Form]:
        return [form for form in self.forms if form.method == "POST"]

    @property
    def redirect_query(self) -> dict[str, str]:
        """The query of the stop redirect (a redirect URI carries code/state/iss or error)."""
        if self.location is None:
            raise BrowserError("page is not a redirect", self)
        return dict(parse_qsl(urlsplit(self.location).query, keep_blank_values=True))


class _FormParser(HTMLParser):
    def __init__(self, base_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.forms: list[Form] = []
        self._form: Form | None = None
        self._button: Button | None = None
        self._select: tuple[str, list[tuple[str, bool]]] | None = None
        self._option: list[Any] | None = None  # [value or None, text, selected]
        self._textarea: list[str] | None = None  # [name, text]

    def handle_starttag(
        self, tag: str, attrs_list: list[tuple[str, str | None]]
    ) -> None:
        attrs = {key: (value if value is not None else "") for key, value in attrs_list}
        if tag == "form":
            # An empty or missing action submits to the document's own URL, query included.
            action = urljoin(self.base_url, attrs.get("action") or self.base_url)
            method = (attrs.get("method") or "get").upper()
            self._form = Form(action=action, method=method, attrs=attrs)
            self.forms.append(self._form)
            return
        form = self._form
        if form is None:
            return
        name = attrs.get("name")
        if tag == "input":
            kind = attrs.get("type", "text").lower()
            if kind in _SUBMIT_BUTTON_TYPES:
                form.buttons.append(
                    Button(name or None, attrs.get("value", ""), attrs.get("value", ""))
                )
                return
            if not name or "disabled" in attrs:
                return
            form.input_names[name] = kind
            if kind in ("checkbox", "radio"):
                if "checked" in attrs:
                    form.fields.append((name, attrs.get("value", "on")))
            elif kind not in _NON_VALUE_INPUT_TYPES:
                form.fields.append((name, attrs.get("value", "")))
        elif tag == "button":
            kind = attrs.get("type", "submit").lower()
            if kind == "submit":
                self._button = Button(name or None, attrs.get("value", ""))
                form.buttons.append(self._button)
        elif tag == "select" and name:
            form.input_names[name] = "select"
            self._select = (name, [])
        elif tag == "option" and self._select is not None:
            self._option = [attrs.get("value"), "", "selected" in attrs]
        elif tag == "textarea" and name:
            form.input_names[name] = "textarea"
            self._textarea = [name, ""]

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button.label += data
        if self._option is not None:
            self._option[1] += data
        if self._textarea is not None:
            self._textarea[1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "button" and self._button is not None:
            self._button.label = self._button.label.strip()
            self._button = None
        elif tag == "option" and self._option is not None and self._select is not None:
            value, text, selected = self._option
            self._select[1].append(
                (value if value is not None else text.strip(), selected)
            )
            self._option = None
        elif tag == "select" and self._select is not None and self._form is not None:
            name, options = self._select
            chosen = [value for value, selected in options if selected] or [
                v for v, _ in options[:1]
            ]
            self._form.fields.extend((name, value) for value in chosen[:1])
            self._select = None
        elif (
            tag == "textarea" and self._textarea is not None and self._form is not None
        ):
            self._form.fields.append((self._textarea[0], self._textarea[1]))
            self._textarea = None


def parse_forms(html: str, base_url: str) -> list[Form]:
    """Every form in ``html`` with its action resolved against ``base_url``."""
    parser = _FormParser(base_url)
    parser.feed(html)
    parser.close()
    return parser.forms


class ScriptedBrowser:
    """An httpx.AsyncClient with cookies, manual redirects and form submission.

    ``history`` records ``(method, url, status)`` for every request, for assertions and
    for failure messages.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        max_redirects: int = 20,
        max_steps: int = 10,
        timeout: float = 15.0,
    ) -> None:
        # trust_env=False: a proxy from the environment must never see loopback test traffic.
        self.client = client or httpx.AsyncClient(
            follow_redirects=False, timeout=timeout, trust_env=False
        )
        self._owns_client = client is None
        self.max_redirects = max_redirects
        self.max_steps = max_steps
        self.history: list[tuple[str, str, int]] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    @property
    def cookies(self) -> httpx.Cookies:
        return self.client.cookies

    # -- primitives ----------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Page:
        """One request, no redirect following."""
        content = None
        all_headers = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        if data is not None:
            content = urlencode(data).encode()
            all_headers["content-type"] = "application/x-www-form-urlencoded"
        all_headers.update(headers or {})
        response = await self.client.request(
            method, url, content=content, headers=all_headers
        )
        self.history.append((method, url, response.status_code))
        text = response.text
        page = Page(
            url=str(response.url),
            status=response.status_code,
            headers=response.headers,
            text=text,
        )
        if (
            response.status_code in _REDIRECT_STATUSES
            and "location" in response.headers
        ):
            page.location = urljoin(page.url, response.headers["location"])
        if page.is_html:
            page.forms = parse_forms(text, page.url)
        return page

    async def follow(self, url: str, *, stop_at: str | None = None) -> Page:
        """GET ``url`` and follow redirects until a non-redirect answer, or until a redirect
        whose Location starts with ``stop_at`` (not requested: it is the client's redirect URI)."""
        return await self._follow(
            await self._checked_stop("GET", url, None, stop_at), stop_at
        )

    async def submit(
        self,
        page: Page,
        form: int | Form | str = 0,
        fields: dict[str, str] | None = None,
        button: str | tuple[str, str] | None = None,
        *,
        stop_at: str | None = None,
    ) -> Page:
        """Submit a form of ``page`` (index, ``Form``, or the name of an input it must have)
        with ``fields`` overriding its defaults, pressing ``button`` (see ``Form.find_button``;
        None presses the first submit button, like pressing Enter), then follow redirects."""
        chosen = self._select_form(page, form)
        overrides = dict(fields or {})
        data: list[tuple[str, str]] = []
        for name, value in chosen.fields:
            if name not in overrides:
                data.append((name, value))
            elif name not in {n for n, _ in data}:
                # An overridden field replaces all its defaults, in the first one's place.
                data.append((name, overrides[name]))
        data += [
            (name, value)
            for name, value in overrides.items()
            if name not in {n for n, _ in data}
        ]
        pressed = (
            chosen.find_button(button)
            if button is not None
            else (chosen.buttons or [None])[0]
        )
        if pressed is not None and pressed.name:
            data.append((pressed.name, pressed.value))
        if chosen.method == "GET":
            parts = urlsplit(chosen.action)
            target = urlunsplit(parts._replace(query=urlencode(data), fragment=""))
            first = await self._checked_stop("GET", target, None, stop_at)
        else:
            first = await self._checked_stop("POST", chosen.action, data, stop_at)
        return await self._follow(first, stop_at)

    def _select_form(self, page: Page, form: int | Form | str) -> Form:
        if isinstance(form, Form):
            return form
        if isinstance(form, str):
            for candidate in page.forms:
                if candidate.has_input(form):
                    return candidate
            raise BrowserError(f"no form with an input named {form!r}", page)
        try:
            return page.forms[form]
        except IndexError:
            raise BrowserError(f"no form #{form}", page) from None

    async def _checked_stop(
        self,
        method: str,
        url: str,
        data: list[tuple[str, str]] | None,
        stop_at: str | None,
    ) -> Page:
        if stop_at is not None and url.startswith(stop_at):
            # Reaching the stop URL directly (e.g. a GET form aimed at it) still ends the walk.
            return Page(
                url=url,
                status=0,
                headers=httpx.Headers(),
                text="",
                location=url,
                stopped_at=url,
            )
        return await self.request(method, url, data=data)

    async def _follow(self, page: Page, stop_at: str | None) -> Page:
        for _ in range(self.max_redirects):
            if page.stopped_at is not None or page.location is None:
                return page
            if stop_at is not None and page.location.startswith(stop_at):
                page.stopped_at = page.location
                return page
            # 307/308 would repeat a POST; nothing on the authorization path uses them for POSTs.
            page = await self.request("GET", page.location)
        raise BrowserError(f"more than {self.max_redirects} redirects", page)

    # -- the authorization walk ---------------------------------------------------------

    async def authorize(
        self,
        url: str,
        *,
        stop_at: str,
        idp_login: dict[str, Any] | None = None,
        consent: str = "approve",
        email: str | None = None,
        idp_action: Literal["authorize", "deny"] = "authorize",
    ) -> dict[str, str]:
        """Walk from ``url`` (a gateway /authorize URL, or an IdP one) to the redirect to
        ``stop_at`` and return that redirect's query parameters."""
        page = await self.follow(url, stop_at=stop_at)
        for _ in range(self.max_steps):
            if page.stopped_at is not None:
                return page.redirect_query
            page = await self._step(
                page, stop_at, idp_login, consent, email, idp_action
            )
        raise BrowserError(
            f"no redirect to {stop_at} after {self.max_steps} pages", page
        )

    async def _step(
        self,
        page: Page,
        stop_at: str,
        idp_login: dict[str, Any] | None,
        consent: str,
        email: str | None,
        idp_action: str,
    ) -> Page:
        if page.status >= 400 or not page.is_html:
            raise BrowserError("the walk ended on an error or non-HTML page", page)
        forms = page.post_forms()
        consent_forms = [f for f in forms if "decision" in f.button_names()]
        login_forms = [f for f in forms if f.has_input("email")]
        idp_forms = [f for f in forms if f.has_input("sub")]
        if len(consent_forms) == 1:
            return await self.submit(
                page, consent_forms[0], button=("decision", consent), stop_at=stop_at
            )
        if len(login_forms) == 1:
            address = email or (idp_login or {}).get("email")
            if not address:
                raise BrowserError("dev sign-in form reached but no email given", page)
            return await self.submit(
                page, login_forms[0], {"email": str(address)}, stop_at=stop_at
            )
        if len(idp_forms) == 1:
            if idp_action == "deny":
                deny = [
                    f
                    for f in forms
                    if ("action", "deny") in {(b.name, b.value) for b in f.buttons}
                ]
                if not deny:
                    raise BrowserError("IdP page has no deny button", page)
                return await self.submit(
                    page, deny[0], button=("action", "deny"), stop_at=stop_at
                )
            if not idp_login or "sub" not in idp_login:
                raise BrowserError(
                    "IdP sign-in page reached but idp_login has no 'sub'", page
                )
            sub = str(idp_login["sub"])
            claims = {key: value for key, value in idp_login.items() if key != "sub"}
            if claims:
                await self._set_idp_user(page.url, sub, claims)
            return await self.submit(page, idp_forms[0], {"sub": sub}, stop_at=stop_at)
        raise BrowserError(
            "no recognisable form (sign-in, IdP or consent) on this page", page
        )

    async def _set_idp_user(
        self, idp_page_url: str, sub: str, claims: dict[str, Any]
    ) -> None:
        parts = urlsplit(idp_page_url)
        response = await self.client.put(
            f"{parts.scheme}://{parts.netloc}/users/{sub}", json=claims
        )
        if response.status_code != 204:
            raise BrowserError(
                f"IdP refused the user's claims ({response.status_code}): {response.text}"
            )
