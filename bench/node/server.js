// The tutorial's server, the part the gateway is compared with (bench/run.py, target `node`):
// GET /profile behind a bearer token verified with njwt (HS256, the tutorial's library and
// algorithm), answering the user's row from SQLite. Written as the tutorial writes it: one
// Express app, a middleware that verifies the token, a handler that reads one row.
//
//   PORT=... JWT_SECRET=... DATABASE=path/to/users.db node server.js
//
// The harness creates the database (table `users`, one row) and signs the token; this
// process only verifies and reads, as the tutorial's /profile does.
'use strict';

const express = require('express');
const njwt = require('njwt');
const sqlite3 = require('sqlite3');

const port = Number(process.env.PORT);
const secret = process.env.JWT_SECRET;
if (!port || !secret || !process.env.DATABASE) {
  console.error('PORT, JWT_SECRET and DATABASE are required');
  process.exit(2);
}
const db = new sqlite3.Database(process.env.DATABASE, sqlite3.OPEN_READONLY);
const app = express();

function requireToken(req, res, next) {
  const header = req.headers.authorization || '';
  if (!header.startsWith('Bearer ')) {
    return res.status(401).json({ error: 'missing bearer token' });
  }
  njwt.verify(header.slice('Bearer '.length), secret, (err, verified) => {
    if (err) {
      return res.status(401).json({ error: err.message });
    }
    req.userId = verified.body.sub;
    next();
  });
}

app.get('/profile', requireToken, (req, res) => {
  db.get('SELECT id, email, name FROM users WHERE id = ?', [req.userId], (err, row) => {
    if (err) {
      return res.status(500).json({ error: err.message });
    }
    if (!row) {
      return res.status(404).json({ error: 'no such user' });
    }
    res.json(row);
  });
});

app.listen(port, '127.0.0.1', () => console.log(`tutorial /profile on 127.0.0.1:${port}`));
