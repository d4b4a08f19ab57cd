"""The HTTP routes, one APIRouter per area; service/app.py includes them."""
