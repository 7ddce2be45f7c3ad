// node-postgres through the gateway: connects with the DSN in argv[2], runs one query, prints
// its result and whether the session is TLS. Exit 0 on success.
const { Client } = require('pg');

async function main() {
  const client = new Client({ connectionString: process.argv[2] });
  await client.connect();
  const r = await client.query('select count(*)::int as n from film');
  const tls = client.connection.stream.encrypted ? 'tls' : 'plain';
  console.log(`${r.rows[0].n} ${tls}`);
  await client.end();
}

main().catch((e) => {
  console.error(`node-postgres: ${e.code || ''} ${e.message}`);
  process.exit(1);
});
