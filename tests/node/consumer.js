// A consumer in Node with Google's official client: handles each message of SUBSCRIPTION,
// then publishes its receipt to AUDIT_TOPIC (docs/receipts.md) and only then acks.
//   node consumer.js PROJECT SUBSCRIPTION TOPIC AUDIT_TOPIC COUNT
// Exits 0 once COUNT messages were handled; PUBSUB_EMULATOR_HOST points it at the emulator.
const {PubSub} = require('@google-cloud/pubsub');

const [project, subscription, topic, auditTopic, count] = process.argv.slice(2);
const pubsub = new PubSub({projectId: project});
const audit = pubsub.topic(auditTopic);
const sub = pubsub.subscription(subscription);
let handled = 0;

function receipt(message) {
  const attributes = {
    'ea.subscription': subscription,
    'ea.topic': topic,
    'ea.messageId': message.id,
    'ea.publishTime': String(message.publishTime.getTime()),
    'ea.receiveTime': String(Date.now()),
  };
  if (message.deliveryAttempt) attributes['ea.deliveryAttempt'] = String(message.deliveryAttempt);
  for (const name of ['eventID', 'publishTime', 'traceparent']) {
    if (message.attributes[name] !== undefined) attributes[name] = message.attributes[name];
  }
  return {data: Buffer.alloc(0), attributes};
}

sub.on('message', async (message) => {
  try {
    // ... the consumer's own work on message.data goes here ...
    await audit.publishMessage(receipt(message));
    message.ack(); // after the receipt message was accepted: never an ack without one
    handled += 1;
    if (handled >= Number(count)) {
      await sub.close();
      process.exit(0);
    }
  } catch (err) {
    console.error(`receipt of ${message.id} not published: ${err}`);
    message.nack();
  }
});
sub.on('error', (err) => {
  console.error(err);
  process.exit(1);
});
