"""The audited push receiver: Pub/Sub push subscriptions, audited like pulled ones."""

from eventaudit.push.oidc import TokenVerifier
from eventaudit.push.receiver import PushMessage, PushMiddleware, PushReceiver, push_blueprint

__all__ = ["PushMessage", "PushMiddleware", "PushReceiver", "TokenVerifier", "push_blueprint"]
