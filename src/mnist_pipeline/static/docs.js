// Swagger UI over this server's own schema; a file of its own, since the page's policy runs no inline script
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
