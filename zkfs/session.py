"""Open an authenticated, unlocked vault from the saved login or a password."""
from __future__ import annotations

import errno
from uuid import UUID

from . import account
from .api import ApiClient
from .crypto import PasswordKeys
from .errors import ServerError, ZkfsError
from .sharekeys import Pins, ShareBook
from .state import LocalState, VersionLedger
from .vault import Vault


def open_vault(state: LocalState, *, server: str | None = None, password: str | None = None,
               retry_seconds: float = 5.0, insecure_http: bool = False) -> Vault:
    """With ``password``, derive keys afresh (unattended mounts); otherwise use
    the keys saved by `client.py login`. Tokens are renewed transparently.
    ``insecure_http``: plain http to a remote host (else only if login allowed it)."""
    cfg = state.config()
    url = server or cfg["server"]
    api = ApiClient(url, cfg.get("token") if not password else None, retry_seconds=retry_seconds,
                    insecure_http=insecure_http or state.insecure_http(url))
    if password is not None:
        username = cfg.get("username")
        if not username:
            raise ZkfsError("no username saved: run `client.py login USERNAME` once")
        keys = account.sign_in(api, username, password)[0].keys
    else:
        saved = state.keys()
        username = saved["username"]
        keys = PasswordKeys(auth_key=saved["auth_key"], kek=saved["kek"])

    def relogin() -> str:
        device = state.config().get("device") if password is None else None
        try:
            answer = account.login(api, username, keys, device)
            token = answer["access_token"]
        except ZkfsError as exc:
            if password is None and exc.errno == errno.EACCES:
                raise ZkfsError("the saved login is no longer valid (password changed elsewhere?): "
                                "run `client.py login` again", errno=errno.EACCES) from None
            raise
        if password is None:
            state.save_config(token=token, **({"device": answer["device"]} if answer.get("device") else {}))
        return token

    api.reauth = relogin
    if api.token is None:
        api.token = relogin()
    try:
        acct = api.account()
    except ServerError as exc:
        if exc.status == 401:
            raise ZkfsError("the saved login is no longer valid: run `client.py login` again") from None
        raise
    keyring = account.Keyring.unlock(acct, keys.kek)
    account.ensure_identity(api, keyring)
    root = UUID(acct["root_inode"])
    ledger = VersionLedger(state.ledger_path)
    try:
        ledger.check_key_gen(root, keyring.current_gen)
        return Vault(api, keyring, root, ledger, unlock=lambda: account.Keyring.unlock(api.account(), keys.kek),
                     book=ShareBook(api, Pins(state, api.base_url)))
    except BaseException:
        ledger.close()
        raise
