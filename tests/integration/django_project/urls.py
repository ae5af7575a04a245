from django.urls import path

from tests.integration.django_project import views

urlpatterns = [
    path("receipt/", views.send_receipt),
    path("sign-up/", views.sign_up),
    path("sign-up-outbox/", views.sign_up_outbox),
]
