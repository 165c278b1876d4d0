// The peer storerelay is compared with: an Express handler that answers Apple 200 at once and then
// POSTs the raw body to RevenueCat with axios, fire and forget (nothing durable, no retry).
//   PORT=... DESTINATION=http://127.0.0.1:.../hook node forwarder.js
const express = require("express");
const axios = require("axios");

const app = express();
const destination = process.env.DESTINATION;
app.post("/apple/notifications", express.raw({ type: "*/*", limit: "1mb" }), (req, res) => {
  res.status(200).send();
  axios
    .post(destination, req.body, { headers: { "Content-Type": "application/json" } })
    .catch((error) => console.error("forward failed:", error.message));
});
app.listen(Number(process.env.PORT), "127.0.0.1");
