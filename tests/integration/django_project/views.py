"""Views that send mail the way a Django application does: nothing postlane-specific but the
``X-Postlane-*`` headers, which the backend reads and removes."""

from __future__ import annotations

import json

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, send_mail
from django.db import connection, connections, transaction
from django.http import HttpRequest, JsonResponse

#: a tiny but real PDF, binary enough to catch any text mangling of attachments
RECEIPT_PDF = (
    b"%PDF-1.1\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


def send_receipt(request: HttpRequest) -> JsonResponse:
    """A receipt with an HTML alternative, two attachments, cc, bcc and reply-to; lane and
    idempotency key from the request."""
    message = EmailMultiAlternatives(
        subject="Your receipt — order 8812",
        body="Thank you for your order.\nTotal: 12,50 €\n",
        to=request.POST.getlist("to"),
        cc=request.POST.getlist("cc"),
        bcc=request.POST.getlist("bcc"),
        reply_to=["help@example.com"],
        headers={
            "X-Order": "8812",
            "X-Postlane-Lane": request.POST.get("lane", ""),
            "X-Postlane-Idempotency-Key": request.POST.get("key", ""),
            "X-Postlane-Metadata": json.dumps({"order": "8812"}),
        },
    )
    message.attach_alternative("<p>Thank you for your order.</p><p>Total: 12,50 €</p>", "text/html")
    message.attach("receipt.pdf", RECEIPT_PDF, "application/pdf")
    message.attach("notes.txt", "Delivered to the café.\n", "text/plain")
    sent = message.send()
    return JsonResponse({"sent": sent, "id": getattr(message, "postlane_id", None)})


class _Rollback(Exception):
    pass


def _welcome(email: str) -> int:
    return send_mail("Welcome", "Hello!", None, [email])


def sign_up(request: HttpRequest) -> JsonResponse:
    """The on_commit pattern: the mail is handed to postlane only once the sign-up committed."""
    email = request.POST["email"]
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("CREATE TABLE IF NOT EXISTS signups (email text)")
                cursor.execute("INSERT INTO signups VALUES (%s)", [email])
            transaction.on_commit(lambda: _welcome(email))
            if request.POST.get("fail"):
                raise _Rollback
    except _Rollback:
        return JsonResponse({"committed": False})
    return JsonResponse({"committed": True})


def sign_up_outbox(request: HttpRequest) -> JsonResponse:
    """The transactional outbox (POSTLANE_OUTBOX = True): the mail is written by the sign-up's
    own transaction, so it commits, or rolls back, with the row."""
    email = request.POST["email"]
    alias = settings.POSTLANE_OUTBOX_DATABASE
    try:
        with transaction.atomic(using=alias):
            with connections[alias].cursor() as cursor:
                cursor.execute(f"INSERT INTO {settings.SIGNUP_TABLE} VALUES (%s)", [email])
            sent = _welcome(email)
            if request.POST.get("fail"):
                raise _Rollback
    except _Rollback:
        return JsonResponse({"committed": False})
    return JsonResponse({"committed": True, "sent": sent})
