"""The API's routes, one module per resource; handlers translate between HTTP and the API's logic."""
